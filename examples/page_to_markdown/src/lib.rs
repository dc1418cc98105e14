//! `web.page_to_markdown@1`: turns a page snapshot (HTML) into Markdown.
//!
//! Built for `wasm32-unknown-unknown` as a d402-wasm-1 module (see `docs/DECISIONS.md`,
//! "Runtime"): it imports nothing and exports `memory`, `d402_alloc` and `d402_run`. The
//! input buffer carries the task input (`{"url": "…"}`), the snapshot's final URL (the base
//! for relative links) and the snapshot body; the output is the Markdown, UTF-8.
//!
//! Deterministic by construction: no clocks, randomness, hashing seeds or floats, and no
//! dependencies.

pub mod html;
pub mod markdown;
pub mod url;

/// Largest task input accepted (the protocol's cap).
pub const MAX_TASK_INPUT: usize = 64 * 1024;

/// Why a run was refused; returned to the host as an error message.
pub type Error = String;

/// Splits the d402-wasm-1 input buffer into task input, final URL and body.
pub fn decode_input(buf: &[u8]) -> Result<(&[u8], Option<(&str, &[u8])>), Error> {
    let header = buf.get(..6).ok_or("input buffer too short")?;
    if &header[..4] != b"d402" || header[4] != 1 {
        return Err("input buffer is not d402-wasm-1 framing version 1".into());
    }
    let has_snapshot = header[5] & 1 == 1;
    let mut rest = &buf[6..];
    let mut parts = [&b""[..]; 3];
    for part in &mut parts {
        let len_bytes: [u8; 4] = rest
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or("truncated input buffer")?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        rest = &rest[4..];
        *part = rest.get(..len).ok_or("truncated input buffer")?;
        rest = &rest[len..];
    }
    if !rest.is_empty() {
        return Err("trailing bytes after the input buffer".into());
    }
    let snapshot = if has_snapshot {
        let url = std::str::from_utf8(parts[1]).map_err(|_| "snapshot URL is not UTF-8")?;
        Some((url, parts[2]))
    } else {
        None
    };
    Ok((parts[0], snapshot))
}

/// Checks the task input: a JSON object whose only member is `"url"`, a string.
pub fn check_task_input(input: &[u8]) -> Result<String, Error> {
    if input.len() > MAX_TASK_INPUT {
        return Err(format!("task input is over {MAX_TASK_INPUT} bytes"));
    }
    let s = std::str::from_utf8(input).map_err(|_| "task input is not UTF-8")?;
    let mut p = JsonCursor { s, i: 0 };
    p.ws();
    p.expect(b'{')?;
    let mut url = None;
    p.ws();
    if p.peek() == Some(b'}') {
        p.i += 1;
    } else {
        loop {
            p.ws();
            let key = p.string()?;
            p.ws();
            p.expect(b':')?;
            p.ws();
            if key != "url" {
                return Err(format!(
                    "unknown task input member {key:?}; only \"url\" is accepted"
                ));
            }
            if url.is_some() {
                return Err("task input has \"url\" twice".into());
            }
            url = Some(p.string()?);
            p.ws();
            match p.peek() {
                Some(b',') => p.i += 1,
                Some(b'}') => {
                    p.i += 1;
                    break;
                }
                _ => return Err("task input is not a JSON object".into()),
            }
        }
    }
    p.ws();
    if p.i != s.len() {
        return Err("trailing characters after the task input".into());
    }
    let url = url.ok_or("task input needs a \"url\" string")?;
    let lower = url.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err("\"url\" must be an http or https URL".into());
    }
    Ok(url)
}

struct JsonCursor<'a> {
    s: &'a str,
    i: usize,
}

impl JsonCursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, b: u8) -> Result<(), Error> {
        if self.peek() == Some(b) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!(
                "task input: expected '{}' at byte {}",
                b as char, self.i
            ))
        }
    }

    fn hex4(&mut self) -> Result<u32, Error> {
        let digits = self
            .s
            .get(self.i..self.i + 4)
            .ok_or("task input: truncated \\u escape")?;
        self.i += 4;
        u32::from_str_radix(digits, 16).map_err(|_| "task input: bad \\u escape".into())
    }

    fn string(&mut self) -> Result<String, Error> {
        self.expect(b'"')?;
        let mut out = String::new();
        loop {
            let rest = &self.s[self.i..];
            let c = rest
                .chars()
                .next()
                .ok_or("task input: unterminated string")?;
            self.i += c.len_utf8();
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let e = self.peek().ok_or("task input: unterminated escape")?;
                    self.i += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xd800..0xdc00).contains(&hi) {
                                if !self.s[self.i..].starts_with("\\u") {
                                    return Err("task input: lone surrogate".into());
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err("task input: bad surrogate pair".into());
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            out.push(char::from_u32(code).ok_or("task input: bad \\u escape")?);
                        }
                        _ => return Err("task input: bad escape".into()),
                    }
                }
                c if (c as u32) < 0x20 => {
                    return Err("task input: control character in string".into());
                }
                c => out.push(c),
            }
        }
    }
}

/// The whole capability: checks the input and converts the snapshot.
pub fn run(buf: &[u8]) -> Result<Vec<u8>, Error> {
    let (task_input, snapshot) = decode_input(buf)?;
    check_task_input(task_input)?;
    let (final_url, body) =
        snapshot.ok_or("web.page_to_markdown needs a page snapshot from the host")?;
    let html = String::from_utf8_lossy(body);
    Ok(markdown::convert(&html, final_url).into_bytes())
}

fn pack(bytes: Vec<u8>, is_error: bool) -> i64 {
    let bytes = bytes.into_boxed_slice();
    let len = bytes.len() as u32 & 0x7fff_ffff;
    let ptr = Box::leak(bytes).as_ptr() as usize as u32;
    let len = if is_error { len | 0x8000_0000 } else { len };
    ((u64::from(ptr) << 32) | u64::from(len)) as i64
}

/// d402-wasm-1: returns a pointer to `len` writable bytes for the host's input.
#[unsafe(no_mangle)]
pub extern "C" fn d402_alloc(len: i32) -> i32 {
    let mut v = Vec::<u8>::with_capacity(len.max(0) as usize);
    let ptr = v.as_mut_ptr();
    std::mem::forget(v);
    ptr as usize as i32
}

/// d402-wasm-1: runs on the input at `ptr..ptr+len`; returns the packed result location.
#[unsafe(no_mangle)]
pub extern "C" fn d402_run(ptr: i32, len: i32) -> i64 {
    // SAFETY: the host wrote `len` bytes at `ptr`, a buffer `d402_alloc(len)` returned; the
    // instance lives for this one call.
    let input =
        unsafe { std::slice::from_raw_parts(ptr as usize as *const u8, len.max(0) as usize) };
    match run(input) {
        Ok(out) => pack(out, false),
        Err(msg) => pack(msg.into_bytes(), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_input_checks() {
        assert_eq!(
            check_task_input(br#" {"url": "https://a.example/\u00e9"} "#).unwrap(),
            "https://a.example/é"
        );
        for bad in [
            &br#"{}"#[..],
            br#"{"url": 1}"#,
            br#"{"url":"ftp://x"}"#,
            br#"{"url":"http://x","y":1}"#,
            br#"[]"#,
            b"{\"url\":\"http://x\"} x",
        ] {
            assert!(
                check_task_input(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn framing_round_trip() {
        let mut buf = b"d402\x01\x01".to_vec();
        for part in [
            &b"{\"url\":\"http://x/\"}"[..],
            b"http://x/",
            b"<h1>Hi</h1>",
        ] {
            buf.extend_from_slice(&(part.len() as u32).to_le_bytes());
            buf.extend_from_slice(part);
        }
        assert_eq!(run(&buf).unwrap(), b"# Hi\n");
        assert!(run(&buf[..buf.len() - 1]).is_err());
        buf[5] = 0;
        assert!(run(&buf).is_err());
    }
}
