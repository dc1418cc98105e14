//! The `d402-wasm-1` ABI: what a capability module must export and how bytes cross.
//!
//! A module speaking this ABI is a core WebAssembly module that **imports nothing** and
//! exports:
//!
//! - `memory`: its linear memory;
//! - `d402_alloc(len: i32) -> i32`: returns a pointer to `len` writable bytes;
//! - `d402_run(ptr: i32, len: i32) -> i64`: runs on the input the host wrote at
//!   `ptr..ptr+len` and returns where its result is, packed as `(ptr << 32) | len`
//!   (both `u32`). When bit 31 of `len` is set the result is an error message (UTF-8,
//!   at most [`MAX_ERROR`] bytes) with length `len & 0x7fff_ffff`; otherwise it is the
//!   output.
//!
//! The input is one buffer, framed by [`encode_input`]:
//!
//! ```text
//! "d402" | version u8 = 1 | flags u8 (bit 0: a snapshot is present)
//! | u32le len | task input (the buyer's JSON bytes)
//! | u32le len | snapshot final URL (UTF-8; empty without a snapshot)
//! | u32le len | snapshot body (bytes; empty without a snapshot)
//! ```

use wasmtime::{ExternType, Module, ValType};

use crate::executor::ExecError;

/// The ABI name carried in manifests.
pub const ABI: &str = d402_capabilities::manifest::WASM_ABI;
/// Magic at the start of the input buffer.
pub const INPUT_MAGIC: &[u8; 4] = b"d402";
/// Version byte of the input framing.
pub const INPUT_VERSION: u8 = 1;
/// Longest error message read back from a guest.
pub const MAX_ERROR: u32 = 4096;
/// Bit of the returned length that marks an error message.
pub const ERROR_BIT: u32 = 0x8000_0000;

/// The memory export.
pub const EXPORT_MEMORY: &str = "memory";
/// The allocator export.
pub const EXPORT_ALLOC: &str = "d402_alloc";
/// The entry point export.
pub const EXPORT_RUN: &str = "d402_run";

/// The snapshot handed to a capability with its task input.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotInput<'a> {
    /// The URL the snapshot was finally loaded from.
    pub final_url: &'a str,
    /// The snapshot bytes (HTML for web capabilities).
    pub body: &'a [u8],
}

/// Frames a task input and an optional snapshot into the ABI's input buffer.
///
/// Fails only when a part is longer than `u32::MAX` bytes.
pub fn encode_input(
    task_input: &[u8],
    snapshot: Option<SnapshotInput<'_>>,
) -> Result<Vec<u8>, ExecError> {
    let (url, body) = snapshot.map_or((&b""[..], &b""[..]), |s| (s.final_url.as_bytes(), s.body));
    let mut out = Vec::with_capacity(6 + 12 + task_input.len() + url.len() + body.len());
    out.extend_from_slice(INPUT_MAGIC);
    out.push(INPUT_VERSION);
    out.push(u8::from(snapshot.is_some()));
    for part in [task_input, url, body] {
        let len =
            u32::try_from(part.len()).map_err(|_| ExecError::InputTooLarge(part.len() as u64))?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(part);
    }
    Ok(out)
}

/// Checks that `module` speaks the ABI: no imports, and the three exports with their types.
pub fn check_module(module: &Module) -> Result<(), ExecError> {
    let imports: Vec<String> = module
        .imports()
        .map(|i| format!("{}::{}", i.module(), i.name()))
        .collect();
    if !imports.is_empty() {
        return Err(ExecError::ImportsNotAllowed(imports));
    }
    let mut memory = false;
    let mut alloc = false;
    let mut run = false;
    for export in module.exports() {
        match (export.name(), export.ty()) {
            (EXPORT_MEMORY, ExternType::Memory(m)) => {
                if m.is_64() || m.is_shared() {
                    return Err(ExecError::BadAbi(
                        "memory must be a 32-bit, non-shared memory".into(),
                    ));
                }
                memory = true;
            }
            (EXPORT_ALLOC, ExternType::Func(f)) => {
                if !(params_are(f.params(), &[ValType::I32])
                    && params_are(f.results(), &[ValType::I32]))
                {
                    return Err(ExecError::BadAbi(format!(
                        "{EXPORT_ALLOC} must have type (i32) -> i32"
                    )));
                }
                alloc = true;
            }
            (EXPORT_RUN, ExternType::Func(f)) => {
                if !(params_are(f.params(), &[ValType::I32, ValType::I32])
                    && params_are(f.results(), &[ValType::I64]))
                {
                    return Err(ExecError::BadAbi(format!(
                        "{EXPORT_RUN} must have type (i32, i32) -> i64"
                    )));
                }
                run = true;
            }
            _ => {}
        }
    }
    for (present, name) in [
        (memory, EXPORT_MEMORY),
        (alloc, EXPORT_ALLOC),
        (run, EXPORT_RUN),
    ] {
        if !present {
            return Err(ExecError::BadAbi(format!("missing export {name:?}")));
        }
    }
    Ok(())
}

fn params_are(actual: impl ExactSizeIterator<Item = ValType>, want: &[ValType]) -> bool {
    actual.len() == want.len() && actual.zip(want).all(|(a, w)| ValType::eq(&a, w))
}

/// Where a guest's result lies, decoded from `d402_run`'s return value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultPtr {
    /// Offset in linear memory.
    pub ptr: u32,
    /// Length in bytes.
    pub len: u32,
    /// Whether the bytes are an error message rather than the output.
    pub is_error: bool,
}

impl ResultPtr {
    /// Decodes the packed `i64`.
    pub fn unpack(packed: i64) -> ResultPtr {
        let bits = packed as u64;
        let ptr = (bits >> 32) as u32;
        let raw_len = bits as u32;
        ResultPtr {
            ptr,
            len: raw_len & !ERROR_BIT,
            is_error: raw_len & ERROR_BIT != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_splits_pointer_length_and_error_bit() {
        let ok = ResultPtr::unpack(((0xdead_beef_u64 << 32) | 12) as i64);
        assert_eq!(
            ok,
            ResultPtr {
                ptr: 0xdead_beef,
                len: 12,
                is_error: false
            }
        );
        let err = ResultPtr::unpack(((16u64 << 32) | 0x8000_0005) as i64);
        assert_eq!(
            err,
            ResultPtr {
                ptr: 16,
                len: 5,
                is_error: true
            }
        );
    }

    #[test]
    fn input_framing_is_length_prefixed() {
        let buf = encode_input(
            b"{}",
            Some(SnapshotInput {
                final_url: "http://a/",
                body: b"<p>",
            }),
        )
        .unwrap();
        assert_eq!(&buf[..6], b"d402\x01\x01");
        assert_eq!(&buf[6..10], &2u32.to_le_bytes());
        assert_eq!(&buf[10..12], b"{}");
        assert_eq!(&buf[12..16], &9u32.to_le_bytes());
        assert_eq!(&buf[25..29], &3u32.to_le_bytes());
        assert_eq!(&buf[29..], b"<p>");
        let none = encode_input(b"x", None).unwrap();
        assert_eq!(
            none,
            b"d402\x01\x00\x01\x00\x00\x00x\x00\x00\x00\x00\x00\x00\x00\x00"
        );
    }
}
