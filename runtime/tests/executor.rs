//! The executor against real wasmtime: fuel, memory, deadline, CID, imports, determinism.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use d402_protocol::Cid;
use d402_runtime::{
    ExecError, Executor, ExecutorConfig, Outcome, RunLimits, TrapReason, executor::Source,
};

const MIB: u64 = 1024 * 1024;

fn limits() -> RunLimits {
    RunLimits {
        fuel: 10_000_000,
        memory_bytes: 16 * MIB,
        wall_time: Duration::from_secs(30),
        output_bytes: MIB,
    }
}

fn executor() -> Executor {
    Executor::new(ExecutorConfig::default()).unwrap()
}

fn wasm(wat: &str) -> (Cid, Vec<u8>) {
    let bytes = wat::parse_str(wat).unwrap();
    (Cid::raw(&bytes), bytes)
}

/// A module speaking the ABI whose `d402_run` body is `run` (params $ptr $len, result i64).
fn abi_module(run: &str) -> String {
    format!(
        r#"(module
  (memory (export "memory") 2)
  (global $count (mut i64) (i64.const 0))
  (func (export "d402_alloc") (param $len i32) (result i32) (i32.const 1024))
  (func $pack (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len))))
  (func (export "d402_run") (param $ptr i32) (param $len i32) (result i64)
    {run})
  (data (i32.const 16) "bad input")
)"#
    )
}

const ECHO: &str = "(call $pack (local.get $ptr) (local.get $len))";

fn run(ex: &Executor, wat: &str, input: &[u8], limits: &RunLimits) -> Outcome {
    let (cid, bytes) = wasm(wat);
    let module = ex.prepare(&cid, &bytes).unwrap();
    ex.run(&module, input, limits).unwrap()
}

#[test]
fn echo_returns_input_and_same_bytes_and_fuel_on_two_executors() {
    let input = b"hello, deterministic world".repeat(100);
    let a = run(&executor(), &abi_module(ECHO), &input, &limits());
    let b = run(&executor(), &abi_module(ECHO), &input, &limits());
    let Outcome::Ok { output, fuel_used } = &a else {
        panic!("{a:?}")
    };
    assert_eq!(output, &input);
    assert!(*fuel_used > 0);
    assert_eq!(a, b, "two executors must agree byte for byte and on fuel");
}

#[test]
fn infinite_loop_stops_out_of_fuel_at_the_same_count_twice() {
    let looping = abi_module(
        "(loop $l (global.set $count (i64.add (global.get $count) (i64.const 1))) (br $l)) (unreachable)",
    );
    let l = RunLimits {
        fuel: 5_000_000,
        ..limits()
    };
    let a = run(&executor(), &looping, b"", &l);
    let b = run(&executor(), &looping, b"", &l);
    assert_eq!(
        a,
        Outcome::Trap {
            reason: TrapReason::OutOfFuel,
            fuel_used: 5_000_000
        }
    );
    assert_eq!(a, b);

    // Metering itself is deterministic: a bounded loop costs exactly the same every time,
    // and more iterations cost more.
    let counted = |n: u32| {
        abi_module(&format!(
            "(local $i i32) (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1))) \
             (br_if $l (i32.lt_u (local.get $i) (i32.const {n})))) (call $pack (i32.const 0) (i32.const 0))"
        ))
    };
    let f1 = run(&executor(), &counted(10_000), b"", &limits()).fuel_used();
    let f2 = run(&executor(), &counted(10_000), b"", &limits()).fuel_used();
    let f3 = run(&executor(), &counted(20_000), b"", &limits()).fuel_used();
    assert_eq!(f1, f2);
    assert!(f3 > f1 + 10_000, "{f3} vs {f1}");
}

#[test]
fn memory_bomb_stops_at_the_limit() {
    // Grow one page at a time forever; the limiter stops it at 16 MiB.
    let bomb = abi_module("(loop $l (drop (memory.grow (i32.const 1))) (br $l)) (unreachable)");
    let out = run(&executor(), &bomb, b"", &limits());
    assert!(
        matches!(
            out,
            Outcome::Trap {
                reason: TrapReason::MemoryLimit(l),
                ..
            } if l == 16 * MIB
        ),
        "{out:?}"
    );

    // A module that declares more initial memory than the limit never starts.
    let big = r#"(module (memory (export "memory") 512)
      (func (export "d402_alloc") (param i32) (result i32) (i32.const 0))
      (func (export "d402_run") (param i32 i32) (result i64) (i64.const 0)))"#;
    let out = run(&executor(), big, b"", &limits());
    assert!(
        matches!(
            out,
            Outcome::Trap {
                reason: TrapReason::MemoryLimit(_),
                ..
            }
        ),
        "{out:?}"
    );
}

#[test]
fn wall_clock_deadline_stops_a_run_with_plenty_of_fuel() {
    let looping = abi_module("(loop $l (br $l)) (unreachable)");
    let l = RunLimits {
        fuel: u64::MAX / 2,
        wall_time: Duration::from_millis(200),
        ..limits()
    };
    let started = Instant::now();
    let out = run(&executor(), &looping, b"", &l);
    assert!(
        matches!(
            out,
            Outcome::Trap {
                reason: TrapReason::Deadline,
                ..
            }
        ),
        "{out:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn module_whose_bytes_do_not_match_the_cid_is_refused() {
    let (_, bytes) = wasm(&abi_module(ECHO));
    let other = Cid::raw(b"something else");
    let err = executor().prepare(&other, &bytes).unwrap_err();
    assert!(matches!(err, ExecError::CidMismatch { .. }), "{err}");
    // A dag-cbor CID is not an implementation CID even when the digest matches.
    let err = executor()
        .prepare(&Cid::dag_cbor(&bytes), &bytes)
        .unwrap_err();
    assert!(matches!(err, ExecError::NotRawCid(_)), "{err}");
}

#[test]
fn module_cannot_reach_files_or_sockets_any_import_is_refused() {
    for (module, name) in [
        ("wasi_snapshot_preview1", "path_open"),
        ("wasi_snapshot_preview1", "fd_write"),
        ("wasi_snapshot_preview1", "sock_accept"),
        ("wasi:sockets/tcp@0.2.0", "connect"),
        ("env", "clock_time_get"),
    ] {
        let wat = format!(
            r#"(module
              (import "{module}" "{name}" (func (param i32 i32) (result i32)))
              (memory (export "memory") 1)
              (func (export "d402_alloc") (param i32) (result i32) (i32.const 0))
              (func (export "d402_run") (param i32 i32) (result i64)
                (drop (call 0 (i32.const 0) (i32.const 0))) (i64.const 0)))"#
        );
        let (cid, bytes) = wasm(&wat);
        let err = executor().prepare(&cid, &bytes).unwrap_err();
        match err {
            ExecError::ImportsNotAllowed(list) => {
                assert_eq!(list, vec![format!("{module}::{name}")])
            }
            other => panic!("{module}::{name}: {other}"),
        }
    }
}

#[test]
fn modules_that_do_not_speak_the_abi_are_refused() {
    for wat in [
        r#"(module (memory (export "memory") 1))"#,
        r#"(module (func (export "d402_alloc") (param i32) (result i32) (i32.const 0))
                   (func (export "d402_run") (param i32 i32) (result i64) (i64.const 0)))"#,
        r#"(module (memory (export "memory") 1)
                   (func (export "d402_alloc") (param i32) (result i32) (i32.const 0))
                   (func (export "d402_run") (param i32 i32) (result i32) (i32.const 0)))"#,
    ] {
        let (cid, bytes) = wasm(wat);
        let err = executor().prepare(&cid, &bytes).unwrap_err();
        assert!(matches!(err, ExecError::BadAbi(_)), "{err}");
    }
    let garbage = b"\0asm\x01\0\0\0garbage".to_vec();
    let err = executor()
        .prepare(&Cid::raw(&garbage), &garbage)
        .unwrap_err();
    assert!(matches!(err, ExecError::Compile(_)), "{err}");
}

#[test]
fn guest_errors_traps_and_bad_results_are_typed() {
    let ex = executor();
    // The error bit marks an error message.
    let out = run(
        &ex,
        &abi_module("(i64.or (call $pack (i32.const 16) (i32.const 9)) (i64.const 0x80000000))"),
        b"",
        &limits(),
    );
    assert!(
        matches!(&out, Outcome::Trap { reason: TrapReason::GuestError(m), .. } if m == "bad input"),
        "{out:?}"
    );
    // A result outside memory.
    let out = run(
        &ex,
        &abi_module("(call $pack (i32.const 131000) (i32.const 100))"),
        b"",
        &limits(),
    );
    assert!(
        matches!(
            out,
            Outcome::Trap {
                reason: TrapReason::BadOutput(_),
                ..
            }
        ),
        "{out:?}"
    );
    // An output over the limit.
    let small = RunLimits {
        output_bytes: 4,
        ..limits()
    };
    let out = run(&ex, &abi_module(ECHO), b"too long", &small);
    assert!(
        matches!(
            out,
            Outcome::Trap {
                reason: TrapReason::BadOutput(_),
                ..
            }
        ),
        "{out:?}"
    );
    // unreachable.
    let out = run(&ex, &abi_module("(unreachable)"), b"", &limits());
    assert!(
        matches!(&out, Outcome::Trap { reason: TrapReason::GuestTrap(m), .. } if m.contains("unreachable")),
        "{out:?}"
    );
    // Unbounded recursion exhausts the stack, not the host.
    let rec = r#"(module (memory (export "memory") 1)
      (func (export "d402_alloc") (param i32) (result i32) (i32.const 0))
      (func $r (param i64) (result i64) (call $r (i64.add (local.get 0) (i64.const 1))))
      (func (export "d402_run") (param i32 i32) (result i64) (call $r (i64.const 0))))"#;
    let out = run(&ex, rec, b"", &limits());
    assert!(
        matches!(&out, Outcome::Trap { reason: TrapReason::GuestTrap(m), .. } if m.contains("stack")),
        "{out:?}"
    );
    // The executor is still usable afterwards.
    assert!(matches!(
        run(&ex, &abi_module(ECHO), b"x", &limits()),
        Outcome::Ok { .. }
    ));
}

#[test]
fn compiled_modules_are_cached_on_disk_by_cid() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("wasm-cache");
    let cfg = ExecutorConfig {
        cache_dir: Some(cache.clone()),
        ..ExecutorConfig::default()
    };
    let (cid, bytes) = wasm(&abi_module(ECHO));
    let a = Executor::new(cfg.clone()).unwrap();
    let (_, src) = a.prepare_traced(&cid, &bytes).unwrap();
    assert_eq!(src, Source::Compiled);
    let (_, src) = a.prepare_traced(&cid, &bytes).unwrap();
    assert_eq!(src, Source::Memory);

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // A second executor (as after a restart) finds it on disk, even without the bytes.
    let b = Executor::new(cfg.clone()).unwrap();
    let module = b.cached(&cid).unwrap();
    let out = b.run(&module, b"cached", &limits()).unwrap();
    assert_eq!(out.into_output().unwrap().0, b"cached");
    let (_, src) = Executor::new(cfg.clone())
        .unwrap()
        .prepare_traced(&cid, &bytes)
        .unwrap();
    assert_eq!(src, Source::Disk);

    // A corrupted entry is detected and the module recompiled.
    for entry in std::fs::read_dir(&cache).unwrap() {
        let path = entry.unwrap().path();
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        std::fs::write(&path, data).unwrap();
    }
    let c = Executor::new(cfg).unwrap();
    assert!(matches!(c.cached(&cid), Err(ExecError::NotCached(_))));
    let (_, src) = c.prepare_traced(&cid, &bytes).unwrap();
    assert_eq!(src, Source::Compiled);
}

#[test]
fn a_full_pool_answers_busy_instead_of_waiting() {
    let ex = Executor::new(ExecutorConfig {
        max_concurrent: 1,
        ..ExecutorConfig::default()
    })
    .unwrap();
    let (cid, bytes) = wasm(&abi_module("(loop $l (br $l)) (unreachable)"));
    let looping = ex.prepare(&cid, &bytes).unwrap();
    let (cid, bytes) = wasm(&abi_module(ECHO));
    let echo = ex.prepare(&cid, &bytes).unwrap();
    let long = RunLimits {
        fuel: u64::MAX / 2,
        wall_time: Duration::from_secs(3),
        ..limits()
    };
    std::thread::scope(|s| {
        // The looping run may itself lose the race for the slot to one of
        // the probes below; it retries until it holds the slot.
        let busy = s.spawn(|| {
            loop {
                match ex.run(&looping, b"", &long) {
                    Err(ExecError::Busy(1)) => std::thread::sleep(Duration::from_millis(1)),
                    other => break other.unwrap(),
                }
            }
        });
        // Wait until the loop holds the only slot, then try a second run.
        let mut saw_busy = false;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            match ex.run(&echo, b"x", &limits()) {
                Err(ExecError::Busy(1)) => {
                    saw_busy = true;
                    break;
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("{e}"),
            }
        }
        assert!(saw_busy, "a second run never saw the pool full");
        assert!(matches!(
            busy.join().unwrap(),
            Outcome::Trap {
                reason: TrapReason::Deadline,
                ..
            }
        ));
    });
    // The slot is free again.
    assert!(matches!(
        ex.run(&echo, b"x", &limits()).unwrap(),
        Outcome::Ok { .. }
    ));
}

/// Runs leave nothing behind for the next run in the same pooled slot: not in the part of
/// linear memory kept resident between runs (reset with memset), not beyond it (returned
/// to the kernel), and the data segment is restored. Each run reads three words (in the
/// data segment, in the first page, 1.5 MiB in) and then overwrites them.
#[test]
fn a_run_sees_nothing_of_the_previous_runs_memory() {
    let wat = r#"(module
  (memory (export "memory") 32)
  (func (export "d402_alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "d402_run") (param $ptr i32) (param $len i32) (result i64)
    (i64.store (i32.const 2048) (i64.load (i32.const 16)))
    (i64.store (i32.const 2056) (i64.load (i32.const 4096)))
    (i64.store (i32.const 2064) (i64.load (i32.const 1572864)))
    (i64.store (i32.const 16) (i64.const -1))
    (i64.store (i32.const 4096) (i64.const -1))
    (i64.store (i32.const 1572864) (i64.const -1))
    (i64.or (i64.shl (i64.const 2048) (i64.const 32)) (i64.const 24)))
  (data (i32.const 16) "bad inpu")
)"#;
    let ex = executor();
    let (cid, bytes) = wasm(wat);
    let module = ex.prepare(&cid, &bytes).unwrap();
    let mut want = b"bad inpu".to_vec();
    want.extend([0u8; 16]);
    // More runs than the pool has slots: slots are reused.
    for i in 0..3 * ExecutorConfig::default().max_concurrent {
        match ex.run(&module, b"x", &limits()).unwrap() {
            Outcome::Ok { output, .. } => assert_eq!(output, want, "run {i}"),
            other => panic!("run {i}: {other:?}"),
        }
    }
}
