//! Client-controlled text in log lines, bounded. A ClientHello may carry a 60 KB server name and a request a
//! kilobytes-long path; an unauthenticated client must not be able to write that much log per connection.

use std::fmt;

/// Bytes of client text a log field shows at most; the rest is summarised as its length.
pub const MAX_LOGGED: usize = 256;

/// Bytes of an error cause a log field shows at most (causes quote plugin messages and, at times, client text).
pub const MAX_LOGGED_CAUSE: usize = 2048;

/// Displays at most [`MAX_LOGGED`] bytes of `self.0`, control characters escaped, then `…(N bytes)`.
#[derive(Debug, Clone, Copy)]
pub struct Clip<'a>(pub &'a str);

/// Like [`Clip`], up to [`MAX_LOGGED_CAUSE`] bytes.
#[derive(Debug, Clone, Copy)]
pub struct ClipCause<'a>(pub &'a str);

impl fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        clipped(f, self.0, MAX_LOGGED)
    }
}

impl fmt::Display for ClipCause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        clipped(f, self.0, MAX_LOGGED_CAUSE)
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub(crate) fn prefix(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn clipped(f: &mut fmt::Formatter<'_>, text: &str, max: usize) -> fmt::Result {
    {
        let shown = prefix(text, max);
        let end = shown.len();
        for c in shown.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_str(c.encode_utf8(&mut [0; 4]))?;
            }
        }
        if end < text.len() {
            write!(f, "…({} bytes)", text.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_and_control_characters_escaped() {
        let long = "a".repeat(60_000);
        let shown = Clip(&long).to_string();
        assert!(shown.len() < MAX_LOGGED + 32, "{}", shown.len());
        assert!(shown.ends_with("…(60000 bytes)"));
        assert_eq!(Clip("a\nb").to_string(), "a\\nb");
        assert_eq!(Clip("short.example").to_string(), "short.example");
        let multibyte = "é".repeat(200);
        assert!(Clip(&multibyte).to_string().ends_with("(400 bytes)"));
    }
}
