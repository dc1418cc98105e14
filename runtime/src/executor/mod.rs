//! The sandboxed Wasm executor on wasmtime.
//!
//! One [`Executor`] owns one wasmtime [`Engine`] configured for deterministic, bounded
//! execution:
//!
//! - **fuel** metering (deterministic; the billing unit) and **epoch interruption** driven by
//!   a ticker thread as a wall-clock backstop;
//! - per-run **memory, table and instance limits** through a [`ResourceLimiter`], and a
//!   fixed maximum Wasm stack;
//! - **NaN canonicalisation**, no threads or shared memory, relaxed SIMD off, one memory and
//!   one table per module, so that honest workers produce identical bytes;
//! - **no ambient authority**: modules must import nothing (see [`abi`]), so they have no
//!   files, sockets, clocks, randomness, environment or arguments by construction;
//! - the **pooling allocator** with copy-on-write memory initialisation and an
//!   [`InstancePre`] per module, so a warm instantiate is a few microseconds;
//! - a **module cache** keyed by implementation CID: bytes are checked against the CID
//!   before anything is compiled, and compiled artifacts are kept on disk (see `cache`).
//!
//! Every run ends in an [`Outcome`]: the output with the fuel used, or a typed
//! [`TrapReason`]. Host-side problems (a CID mismatch, a module that does not speak the ABI)
//! are [`ExecError`]s. Nothing a module does can crash or hang the host.

pub mod abi;
mod cache;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use d402_capabilities::Limits;
use d402_protocol::{Cid, Codec};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module, OptLevel,
    PoolingAllocationConfig, ResourceLimiter, Store, Strategy, Trap,
};

use cache::DiskCache;

/// How often the epoch ticker advances the engine's epoch.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Largest Wasm module accepted for compilation.
pub const MAX_MODULE_BYTES: usize = 32 * 1024 * 1024;
/// Maximum Wasm call-stack size.
pub const MAX_WASM_STACK: usize = 1024 * 1024;
/// Most elements a table may have.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Bytes of each pooled linear memory and table kept resident (reset with memset) between
/// runs; beyond them, memory is returned to the kernel as before.
pub const KEEP_RESIDENT: usize = 1024 * 1024;
/// Most compiled modules kept in memory.
const MEMORY_CACHE_ENTRIES: usize = 64;

/// Host-side failures: the module was not run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The module's bytes do not hash to the implementation CID.
    #[error("module bytes do not match implementation CID {expected} (they hash to {actual})")]
    CidMismatch {
        /// The CID the manifest names.
        expected: String,
        /// The CID of the bytes given.
        actual: String,
    },
    /// The implementation CID is not a `raw` CID.
    #[error("implementation CID {0} is not a raw CID")]
    NotRawCid(String),
    /// The module is larger than [`MAX_MODULE_BYTES`].
    #[error("module is {0} bytes, over the {MAX_MODULE_BYTES}-byte cap")]
    ModuleTooLarge(usize),
    /// Wasmtime refused the module (invalid Wasm, unsupported feature).
    #[error("invalid module: {0}")]
    Compile(String),
    /// The module imports something; d402 modules get no imports at all.
    #[error("module imports {0:?}; d402-wasm-1 modules may not import anything")]
    ImportsNotAllowed(Vec<String>),
    /// The module does not speak the `d402-wasm-1` ABI.
    #[error("module does not speak d402-wasm-1: {0}")]
    BadAbi(String),
    /// The input is larger than a 32-bit module can take.
    #[error("input of {0} bytes is too large")]
    InputTooLarge(u64),
    /// Every instance slot is in use; retry later.
    #[error("executor busy: all {0} instance slots are in use")]
    Busy(u32),
    /// The compiled-module cache failed.
    #[error("module cache: {0}")]
    Cache(String),
    /// The engine could not be set up.
    #[error("engine setup: {0}")]
    Engine(String),
    /// The module is not in the cache and no bytes were given.
    #[error("module {0} is not cached")]
    NotCached(String),
}

/// Why a run stopped without output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrapReason {
    /// The fuel budget ran out.
    #[error("out of fuel")]
    OutOfFuel,
    /// The module tried to grow memory past its limit.
    #[error("memory limit of {0} bytes reached")]
    MemoryLimit(u64),
    /// The wall-clock deadline passed.
    #[error("deadline exceeded")]
    Deadline,
    /// The module trapped (unreachable, out-of-bounds access, stack overflow …).
    #[error("guest trap: {0}")]
    GuestTrap(String),
    /// The module returned an error message through the ABI.
    #[error("guest error: {0}")]
    GuestError(String),
    /// The module returned a result the host cannot accept.
    #[error("bad output: {0}")]
    BadOutput(String),
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The module returned its output.
    Ok {
        /// The output bytes.
        output: Vec<u8>,
        /// Fuel consumed (deterministic).
        fuel_used: u64,
    },
    /// The module stopped without output.
    Trap {
        /// Why.
        reason: TrapReason,
        /// Fuel consumed up to that point.
        fuel_used: u64,
    },
}

impl Outcome {
    /// Fuel consumed, whatever the outcome.
    pub fn fuel_used(&self) -> u64 {
        match self {
            Outcome::Ok { fuel_used, .. } | Outcome::Trap { fuel_used, .. } => *fuel_used,
        }
    }

    /// The output, or the trap reason as an error.
    pub fn into_output(self) -> Result<(Vec<u8>, u64), TrapReason> {
        match self {
            Outcome::Ok { output, fuel_used } => Ok((output, fuel_used)),
            Outcome::Trap { reason, .. } => Err(reason),
        }
    }
}

/// Limits of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// Fuel budget.
    pub fuel: u64,
    /// Largest linear memory in bytes.
    pub memory_bytes: u64,
    /// Wall-clock backstop.
    pub wall_time: Duration,
    /// Largest output in bytes.
    pub output_bytes: u64,
}

impl From<&Limits> for RunLimits {
    fn from(l: &Limits) -> Self {
        RunLimits {
            fuel: l.fuel,
            memory_bytes: l.memory_bytes,
            wall_time: Duration::from_millis(l.wall_time_ms),
            output_bytes: l.output_bytes,
        }
    }
}

/// How an [`Executor`] is set up.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Directory for compiled artifacts (under the node's state); `None` keeps them in
    /// memory only.
    pub cache_dir: Option<PathBuf>,
    /// Most runs at once (pooling-allocator slots).
    pub max_concurrent: u32,
    /// Largest memory any run may get; per-run limits are at most this.
    pub max_memory_bytes: u64,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            cache_dir: None,
            max_concurrent: 8,
            max_memory_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// Per-store host state: only the limiter, since modules have no imports.
struct HostState {
    limiter: RunLimiter,
}

struct RunLimiter {
    memory_bytes: u64,
    memory_hit: bool,
}

/// The error a limiter returns when a memory would outgrow its limit.
#[derive(Debug, thiserror::Error)]
#[error("memory limit reached")]
struct MemoryLimitHit;

impl ResourceLimiter for RunLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_bytes {
            self.memory_hit = true;
            return Err(wasmtime::Error::new(MemoryLimitHit));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }
}

/// A module that passed the CID and ABI checks, compiled and ready to instantiate.
#[derive(Clone)]
pub struct PreparedModule {
    cid: Cid,
    pre: InstancePre<HostState>,
}

impl PreparedModule {
    /// The implementation CID.
    pub fn cid(&self) -> &Cid {
        &self.cid
    }
}

impl std::fmt::Debug for PreparedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedModule")
            .field("cid", &self.cid)
            .finish_non_exhaustive()
    }
}

/// Where a prepared module came from (for logs and benchmarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Already compiled in this process.
    Memory,
    /// Loaded from the on-disk artifact cache.
    Disk,
    /// Compiled now.
    Compiled,
}

struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
    disk: Option<DiskCache>,
    modules: Mutex<HashMap<Cid, PreparedModule>>,
    config: ExecutorConfig,
    // Dropping the sender stops the ticker thread.
    _ticker: mpsc::Sender<()>,
}

/// The Wasm executor. Cheap to clone; clones share the engine and the caches.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The wasmtime configuration every executor uses. It is part of the determinism contract.
fn engine_config(cfg: &ExecutorConfig) -> Config {
    let mut c = Config::new();
    c.strategy(Strategy::Cranelift)
        .cranelift_opt_level(OptLevel::Speed)
        .consume_fuel(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .cranelift_nan_canonicalization(true)
        .wasm_relaxed_simd(false)
        .relaxed_simd_deterministic(true)
        .wasm_multi_memory(false)
        .wasm_memory64(false)
        .parallel_compilation(true)
        .memory_init_cow(true);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(cfg.max_concurrent)
        .total_memories(cfg.max_concurrent)
        .total_tables(cfg.max_concurrent)
        .max_memories_per_module(1)
        .max_tables_per_module(1)
        .table_elements(MAX_TABLE_ELEMENTS)
        .max_memory_size(cfg.max_memory_bytes as usize)
        // A slot's first KEEP_RESIDENT bytes are reset with memset when it is reused,
        // not returned to the kernel: a small module's run then takes no page faults
        // and no `madvise` (whose TLB shootdown interrupts the other cores).
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT);
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    c
}

impl Executor {
    /// Sets up the engine, the caches and the epoch ticker thread.
    pub fn new(config: ExecutorConfig) -> Result<Executor, ExecError> {
        if config.max_memory_bytes == 0 || config.max_memory_bytes > 4 * 1024 * 1024 * 1024 {
            return Err(ExecError::Engine(
                "max_memory_bytes must be between 1 and 4 GiB".into(),
            ));
        }
        let engine =
            Engine::new(&engine_config(&config)).map_err(|e| ExecError::Engine(e.to_string()))?;
        let disk = match &config.cache_dir {
            Some(dir) => Some(DiskCache::open(dir, &engine)?),
            None => None,
        };
        let (tx, rx) = mpsc::channel::<()>();
        let ticking = engine.clone();
        thread::Builder::new()
            .name("d402-epoch".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(EPOCH_TICK) {
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| ExecError::Engine(format!("epoch thread: {e}")))?;
        Ok(Executor {
            inner: Arc::new(Inner {
                linker: Linker::new(&engine),
                engine,
                disk,
                modules: Mutex::new(HashMap::new()),
                config,
                _ticker: tx,
            }),
        })
    }

    fn remember(&self, prepared: &PreparedModule) {
        let mut map = self.inner.modules.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MEMORY_CACHE_ENTRIES
            && let Some(evict) = map.keys().next().copied()
        {
            map.remove(&evict);
        }
        map.insert(prepared.cid, prepared.clone());
    }

    /// The module of `cid` if it is held in memory: no hashing, compiling or disk access,
    /// so cheap enough to call from an async task. It entered memory through
    /// [`Executor::prepare`] (bytes checked against `cid`, then compiled or loaded from the
    /// disk cache) or [`Executor::cached`] (the disk cache, whose artifacts are named by
    /// CID and written only by `prepare`).
    pub fn in_memory(&self, cid: &Cid) -> Option<PreparedModule> {
        self.inner
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cid)
            .cloned()
    }

    fn finish(&self, cid: Cid, module: Module) -> Result<PreparedModule, ExecError> {
        abi::check_module(&module)?;
        let pre = self
            .inner
            .linker
            .instantiate_pre(&module)
            .map_err(|e| ExecError::BadAbi(e.to_string()))?;
        let prepared = PreparedModule { cid, pre };
        self.remember(&prepared);
        Ok(prepared)
    }

    /// A module already compiled (in memory or on disk), without its bytes.
    pub fn cached(&self, cid: &Cid) -> Result<PreparedModule, ExecError> {
        if let Some(p) = self.in_memory(cid) {
            return Ok(p);
        }
        let module = self
            .inner
            .disk
            .as_ref()
            .and_then(|d| d.load(&self.inner.engine, cid))
            .ok_or_else(|| ExecError::NotCached(cid.to_string()))?;
        self.finish(*cid, module)
    }

    /// Checks `wasm` against `cid`, then compiles it (or takes it from a cache) and checks
    /// the ABI. The bytes are hashed before anything else looks at them.
    pub fn prepare(&self, cid: &Cid, wasm: &[u8]) -> Result<PreparedModule, ExecError> {
        self.prepare_traced(cid, wasm).map(|(p, _)| p)
    }

    /// As [`Executor::prepare`], also saying where the module came from.
    pub fn prepare_traced(
        &self,
        cid: &Cid,
        wasm: &[u8],
    ) -> Result<(PreparedModule, Source), ExecError> {
        let _span = tracing::debug_span!("wasm_prepare", %cid, len = wasm.len()).entered();
        if cid.codec() != Codec::Raw {
            return Err(ExecError::NotRawCid(cid.to_string()));
        }
        if wasm.len() > MAX_MODULE_BYTES {
            return Err(ExecError::ModuleTooLarge(wasm.len()));
        }
        cid.verify(wasm).map_err(|_| ExecError::CidMismatch {
            expected: cid.to_string(),
            actual: Cid::raw(wasm).to_string(),
        })?;
        if let Some(p) = self.in_memory(cid) {
            return Ok((p, Source::Memory));
        }
        if let Some(module) = self
            .inner
            .disk
            .as_ref()
            .and_then(|d| d.load(&self.inner.engine, cid))
        {
            return Ok((self.finish(*cid, module)?, Source::Disk));
        }
        let started = Instant::now();
        let module = Module::new(&self.inner.engine, wasm)
            .map_err(|e| ExecError::Compile(format!("{e:#}")))?;
        tracing::debug!(%cid, elapsed_ms = started.elapsed().as_millis() as u64, "compiled module");
        let prepared = self.finish(*cid, module.clone())?;
        if let Some(disk) = &self.inner.disk
            && let Err(e) = disk.store(cid, &module)
        {
            tracing::warn!(%cid, error = %e, "could not write compiled-module cache");
        }
        Ok((prepared, Source::Compiled))
    }

    /// Runs a prepared module on `input` under `limits`.
    ///
    /// Returns `Err` only for host-side problems; everything the module does ends in an
    /// [`Outcome`].
    pub fn run(
        &self,
        module: &PreparedModule,
        input: &[u8],
        limits: &RunLimits,
    ) -> Result<Outcome, ExecError> {
        let span = tracing::debug_span!("wasm_run", cid = %module.cid, input_len = input.len());
        let _entered = span.enter();
        let input_len =
            i32::try_from(input.len()).map_err(|_| ExecError::InputTooLarge(input.len() as u64))?;
        let memory_bytes = limits.memory_bytes.min(self.inner.config.max_memory_bytes);
        let mut store = Store::new(
            &self.inner.engine,
            HostState {
                limiter: RunLimiter {
                    memory_bytes,
                    memory_hit: false,
                },
            },
        );
        store.limiter(|s| &mut s.limiter);
        store
            .set_fuel(limits.fuel)
            .map_err(|e| ExecError::Engine(e.to_string()))?;
        let ticks = limits
            .wall_time
            .as_millis()
            .div_ceil(EPOCH_TICK.as_millis())
            .saturating_add(1);
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        store.epoch_deadline_trap();

        let outcome = match call(&mut store, module, input, input_len, limits.output_bytes) {
            Ok(Ok(output)) => Outcome::Ok {
                output,
                fuel_used: fuel_used(&store, limits.fuel),
            },
            Ok(Err(reason)) => Outcome::Trap {
                reason,
                fuel_used: fuel_used(&store, limits.fuel),
            },
            Err(CallError::Busy) => return Err(ExecError::Busy(self.inner.config.max_concurrent)),
            Err(CallError::Wasm(e)) => Outcome::Trap {
                reason: classify(&e, &store),
                fuel_used: fuel_used(&store, limits.fuel),
            },
        };
        match &outcome {
            Outcome::Ok { output, fuel_used } => {
                tracing::debug!(fuel_used, output_len = output.len(), "wasm run ok")
            }
            Outcome::Trap { reason, fuel_used } => {
                tracing::debug!(fuel_used, %reason, "wasm run trapped")
            }
        }
        Ok(outcome)
    }
}

enum CallError {
    Busy,
    Wasm(wasmtime::Error),
}

impl From<wasmtime::Error> for CallError {
    fn from(e: wasmtime::Error) -> Self {
        if e.is::<wasmtime::PoolConcurrencyLimitError>() {
            CallError::Busy
        } else {
            CallError::Wasm(e)
        }
    }
}

fn fuel_used(store: &Store<HostState>, budget: u64) -> u64 {
    budget.saturating_sub(store.get_fuel().unwrap_or(0))
}

fn classify(e: &wasmtime::Error, store: &Store<HostState>) -> TrapReason {
    if store.data().limiter.memory_hit || e.is::<MemoryLimitHit>() {
        return TrapReason::MemoryLimit(store.data().limiter.memory_bytes);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => TrapReason::OutOfFuel,
        Some(Trap::Interrupt) => TrapReason::Deadline,
        Some(trap) => TrapReason::GuestTrap(trap.to_string()),
        None => TrapReason::GuestTrap(format!("{e:#}")),
    }
}

/// Instantiates and calls the module; the inner `Err` is a deterministic refusal of the
/// module's result.
fn call(
    store: &mut Store<HostState>,
    module: &PreparedModule,
    input: &[u8],
    input_len: i32,
    max_output: u64,
) -> Result<Result<Vec<u8>, TrapReason>, CallError> {
    let instance = module.pre.instantiate(&mut *store)?;
    let (Some(memory), Ok(alloc), Ok(run)) = (
        instance.get_memory(&mut *store, abi::EXPORT_MEMORY),
        instance.get_typed_func::<i32, i32>(&mut *store, abi::EXPORT_ALLOC),
        instance.get_typed_func::<(i32, i32), i64>(&mut *store, abi::EXPORT_RUN),
    ) else {
        // `check_module` verified these; kept as a refusal rather than a panic.
        return Ok(Err(TrapReason::BadOutput("ABI exports missing".into())));
    };
    let ptr = alloc.call(&mut *store, input_len)?;
    if memory
        .write(&mut *store, ptr as u32 as usize, input)
        .is_err()
    {
        return Ok(Err(TrapReason::BadOutput(format!(
            "{} returned {:#x}, outside memory, for {} input bytes",
            abi::EXPORT_ALLOC,
            ptr as u32,
            input.len()
        ))));
    }
    let packed = run.call(&mut *store, (ptr, input_len))?;
    let result = abi::ResultPtr::unpack(packed);
    let cap = if result.is_error {
        u64::from(abi::MAX_ERROR)
    } else {
        max_output
    };
    if u64::from(result.len) > cap {
        return Ok(Err(TrapReason::BadOutput(format!(
            "{} is {} bytes, over the {cap}-byte limit",
            if result.is_error {
                "error message"
            } else {
                "output"
            },
            result.len
        ))));
    }
    let data = memory.data(&*store);
    let start = result.ptr as usize;
    let Some(bytes) = start
        .checked_add(result.len as usize)
        .and_then(|end| data.get(start..end))
    else {
        return Ok(Err(TrapReason::BadOutput(format!(
            "result at {:#x}+{} lies outside memory",
            result.ptr, result.len
        ))));
    };
    if result.is_error {
        return Ok(Err(TrapReason::GuestError(
            String::from_utf8_lossy(bytes).into_owned(),
        )));
    }
    Ok(Ok(bytes.to_vec()))
}
