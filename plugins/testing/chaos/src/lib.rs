//! Test-only plugin that misbehaves on purpose. The first label of the server name picks the behaviour:
//!
//! | label     | behaviour                                                          |
//! |-----------|--------------------------------------------------------------------|
//! | `loop`    | spins forever (the host's deadline must cut it off)                |
//! | `trap`    | panics, which traps the instance                                   |
//! | `bomb`    | allocates memory until the host's cap stops it                     |
//! | `error`   | returns an error message                                           |
//! | `garbage` | returns a "certificate" that is not PEM                            |
//! | `escape`  | tries to read a file outside its granted directory                 |
//! | `slow`    | waits 1.5 s, then serves files like any other name                 |
//! | `residue` | reports what an earlier call left in its memory, then leaves some  |
//! | anything  | else: `/<name>.crt` and `/<name>.key` from the granted directory    |
//!
//! Every call logs one line through the host so tests can see the log import work.

use tern_guest::{Certificate, Selection, Selector, log};

struct Chaos;

impl Selector for Chaos {
    fn select(servername: &str) -> Result<Selection, String> {
        log::info(&format!("chaos selecting {servername}"));
        let label = servername.split('.').next().unwrap_or_default();
        match label {
            "loop" => spin(),
            "trap" => panic!("chaos: trap requested for {servername}"),
            "bomb" => bomb(),
            "error" => Err(format!("chaos: error requested for {servername}")),
            "garbage" => Ok(Selection::Found(Certificate::new("this is not PEM", "neither is this"))),
            "escape" => match std::fs::read_to_string("/../../../../etc/hostname") {
                Ok(text) => Err(format!("chaos: escaped the sandbox and read {} bytes", text.len())),
                Err(err) => Err(format!("chaos: sandbox held: {err}")),
            },
            "slow" => {
                // Waits on the clock rather than std::thread::sleep, which returns at once in this guest.
                let until = std::time::Instant::now() + std::time::Duration::from_millis(1500);
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
                read_files(servername)
            }
            "residue" => residue(),
            _ => read_files(servername),
        }
    }
}

/// Initialised data: its page comes from the component's image.
static mut MARK: u64 = 0x5EED;
/// Zero-initialised memory, 6 MiB: its pages start as zeros, beyond the image.
static mut SCRATCH: [u8; SCRATCH_BYTES] = [0; SCRATCH_BYTES];
const SCRATCH_BYTES: usize = 6 << 20;
const PAGE: usize = 4096;

/// Fails with what it found of an earlier call (`MARK` changed, any byte of `SCRATCH` not zero), or with
/// "residue: clean"; then changes `MARK` and writes every other page of `SCRATCH` (768 separate dirty regions,
/// more than a partial reset scan covers), so that a next call given this instance's memory unreset would see it.
fn residue() -> Result<Selection, String> {
    // SAFETY: the guest is single-threaded and nothing else holds references to these statics.
    let (mark, scratch) = unsafe { (&mut *std::ptr::addr_of_mut!(MARK), &mut *std::ptr::addr_of_mut!(SCRATCH)) };
    let mark_seen = std::hint::black_box(*mark);
    let dirty = scratch.chunks(PAGE).filter(|page| page.iter().any(|&b| b != 0)).count();
    *mark = 0xDEAD;
    for page in scratch.chunks_mut(PAGE).step_by(2) {
        page.fill(0xA5);
    }
    std::hint::black_box(&scratch);
    if mark_seen != 0x5EED || dirty != 0 {
        return Err(format!("residue: found mark {mark_seen:#x} and {dirty} dirty pages of an earlier call"));
    }
    Err("residue: clean".into())
}

tern_guest::export_selector!(Chaos);

fn spin() -> ! {
    let mut counter = 0u64;
    loop {
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}

fn bomb() -> Result<Selection, String> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        // Touch every page so the memory is really committed, not just reserved.
        hoard.push(vec![0xA5; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

fn read_files(servername: &str) -> Result<Selection, String> {
    let read = |ext: &str| std::fs::read_to_string(format!("/{servername}.{ext}"));
    match (read("crt"), read("key")) {
        (Ok(chain), Ok(key)) => Ok(Selection::Found(Certificate::new(chain, key))),
        _ => Ok(Selection::NotFound),
    }
}
