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
            _ => read_files(servername),
        }
    }
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
