//! Executor benchmarks (issue 4's numbers).
//!
//! - `warm/instantiate_call_trivial`: instantiate + call a trivial d402-wasm-1 module whose
//!   compiled form is already cached (target: median ≤ 50 µs);
//! - floors measured in the same run: `floor/native_call` (a bare function call) and
//!   `floor/wasmtime_empty_instantiate` (plain wasmtime instantiating an empty module with
//!   the same pooling engine settings but no limits, fuel or ABI work);
//! - `cold/compile_page_to_markdown`: compiling the committed page_to_markdown module;
//! - `page_to_markdown/1mb`: converting a 1 MB page (fuel printed once).
//!
//! Run: `cargo bench -p d402-runtime --bench executor`.

use std::{hint::black_box, path::Path, time::Duration};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use d402_capabilities::Manifest;
use d402_protocol::Cid;
use d402_runtime::{
    Executor, ExecutorConfig, Outcome, RunLimits,
    executor::abi::{SnapshotInput, encode_input},
};

const TRIVIAL: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "d402_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "d402_run") (param $p i32) (param $l i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32))
            (i64.extend_i32_u (local.get $l)))))"#;

fn limits() -> RunLimits {
    RunLimits {
        fuel: 1_000_000,
        memory_bytes: 16 * 1024 * 1024,
        wall_time: Duration::from_secs(10),
        output_bytes: 1024 * 1024,
    }
}

fn example(path: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/page_to_markdown")
            .join(path),
    )
    .expect("example file")
}

#[inline(never)]
fn native_echo(input: &[u8]) -> usize {
    input.len()
}

/// A realistic ~1 MB page: the fixtures repeated inside one body.
fn one_mb_page() -> Vec<u8> {
    let mut parts = Vec::new();
    for name in [
        "blog_post",
        "docs_reference",
        "news_article",
        "product_page",
        "wiki_article",
    ] {
        parts.push(example(&format!("fixtures/{name}.html")));
    }
    let mut page = b"<html><body>".to_vec();
    while page.len() < 1024 * 1024 {
        for p in &parts {
            page.extend_from_slice(p);
        }
    }
    page.truncate(1024 * 1024);
    page
}

fn benches(c: &mut Criterion) {
    let trivial = wat::parse_str(TRIVIAL).expect("wat");
    let trivial_cid = Cid::raw(&trivial);
    let ex = Executor::new(ExecutorConfig::default()).expect("executor");
    let prepared = ex.prepare(&trivial_cid, &trivial).expect("prepare");
    let input = [7u8; 16];

    let mut floor = c.benchmark_group("floor");
    floor.bench_function("native_call", |b| b.iter(|| native_echo(black_box(&input))));
    {
        let mut config = wasmtime::Config::new();
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(
            wasmtime::PoolingAllocationConfig::new(),
        ));
        let engine = wasmtime::Engine::new(&config).expect("engine");
        let empty = wasmtime::Module::new(&engine, wat::parse_str("(module)").expect("wat"))
            .expect("module");
        let linker = wasmtime::Linker::<()>::new(&engine);
        let pre = linker.instantiate_pre(&empty).expect("pre");
        floor.bench_function("wasmtime_empty_instantiate", |b| {
            b.iter(|| {
                let mut store = wasmtime::Store::new(&engine, ());
                black_box(pre.instantiate(&mut store).expect("instantiate"));
            })
        });
    }
    floor.finish();

    let mut warm = c.benchmark_group("warm");
    warm.bench_function("instantiate_call_trivial", |b| {
        b.iter(|| {
            let out = ex
                .run(&prepared, black_box(&input), &limits())
                .expect("run");
            black_box(out)
        })
    });
    warm.finish();

    let wasm = example("page_to_markdown.wasm");
    let manifest: Manifest = serde_json::from_slice(&example("capability.json")).expect("manifest");
    let cid = manifest.implementation.cid;

    let mut cold = c.benchmark_group("cold");
    cold.sample_size(10);
    cold.bench_function("compile_page_to_markdown", |b| {
        b.iter_batched(
            || Executor::new(ExecutorConfig::default()).expect("executor"),
            |fresh| black_box(fresh.prepare(&cid, &wasm).expect("compile")),
            BatchSize::PerIteration,
        )
    });
    cold.finish();

    let page = one_mb_page();
    let url = "https://bench.example/page.html";
    let task = br#"{"url":"https://bench.example/page.html"}"#;
    let buf = encode_input(
        task,
        Some(SnapshotInput {
            final_url: url,
            body: &page,
        }),
    )
    .expect("input");
    let p2m = ex.prepare(&cid, &wasm).expect("prepare");
    let run_limits = RunLimits::from(&manifest.limits);
    match ex.run(&p2m, &buf, &run_limits).expect("run") {
        Outcome::Ok { output, fuel_used } => println!(
            "page_to_markdown/1mb: input {} bytes -> output {} bytes, fuel_used {fuel_used}",
            page.len(),
            output.len()
        ),
        other => panic!("1 MB page did not convert: {other:?}"),
    }
    let mut big = c.benchmark_group("page_to_markdown");
    big.sample_size(10);
    big.bench_function("1mb", |b| {
        b.iter(|| black_box(ex.run(&p2m, &buf, &run_limits).expect("run")))
    });
    big.finish();
}

criterion_group!(executor, benches);
criterion_main!(executor);
