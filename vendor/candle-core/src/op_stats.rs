//! Counting of backend operations (a distill patch, vendor/README.md): how many operations a
//! computation dispatches to the backend (on CUDA: kernel launches, roughly one each) and about
//! how many bytes of device memory they read and write. Off unless [`set_enabled`]; when off each
//! operation pays one relaxed atomic load.
//!
//! Bytes are counted from the layouts: every input element an operation addresses (a broadcast
//! dimension, stride 0, counts once) plus its output; a matrix product counts its operands, its
//! output and `2·b·m·n·k` flops. Custom ops count their inputs and their output (a custom op that
//! launches two kernels counts as one operation).
//!
//! `CANDLE_OP_STATS_TRACE=kind[:name]` prints a backtrace for each counted operation of that kind
//! (and name), to find where a computation dispatches it.
//!
//! With [`set_timing`] (a function that waits for the device), each counted operation first waits
//! for the device, and the time since the previous counted operation goes to that one: its kernel's
//! time plus its dispatch and a wait (microseconds; on the CPU the operation's own time).

use crate::{DType, Layout};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

static ON: AtomicBool = AtomicBool::new(false);
thread_local! {
    static PAUSED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}
type Key = (&'static str, &'static str);
static STATS: Mutex<BTreeMap<Key, OpStat>> = Mutex::new(BTreeMap::new());
type Waiter = Box<dyn Fn() + Send + Sync>;
/// The device wait of [`set_timing`], and the operation being timed with when it was dispatched.
static TIMING: Mutex<(Option<Waiter>, Option<(Key, std::time::Instant)>)> = Mutex::new((None, None));
static TIMED: AtomicBool = AtomicBool::new(false);

/// Counts for one kind of operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStat {
    pub calls: u64,
    pub bytes: u64,
    pub flops: u64,
    /// Nanoseconds, with [`set_timing`] (else 0).
    pub nanos: u64,
}

/// Times each counted operation (see the module's docs) with `sync` waiting for the device the
/// operations run on; `None` stops timing.
pub fn set_timing(sync: Option<Waiter>) {
    let mut t = TIMING.lock().unwrap_or_else(|e| e.into_inner());
    TIMED.store(sync.is_some(), Ordering::Relaxed);
    *t = (sync, None);
}

/// A matrix product's name: its dtype; while timing, also its shape (`bf16 b x m x n x k`, names
/// interned: a model has a handful of shapes), so the timed products show which are slow.
pub(crate) fn matmul_name(dtype: DType, (b, m, n, k): (usize, usize, usize, usize)) -> &'static str {
    if !TIMED.load(Ordering::Relaxed) || !ON.load(Ordering::Relaxed) {
        return dtype.as_str();
    }
    static NAMES: Mutex<BTreeMap<(&'static str, [usize; 4]), &'static str>> = Mutex::new(BTreeMap::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    names.entry((dtype.as_str(), [b, m, n, k])).or_insert_with(|| {
        Box::leak(format!("{} {b}x{m}x{n}x{k}", dtype.as_str()).into_boxed_str())
    })
}

/// Waits for the device and closes the interval of the operation being timed, opening one for
/// `next` (None: none).
fn clock(next: Option<Key>) {
    if !TIMED.load(Ordering::Relaxed) {
        return;
    }
    let mut t = TIMING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(sync) = &t.0 {
        sync();
    }
    let now = std::time::Instant::now();
    if let Some((key, since)) = std::mem::replace(&mut t.1, next.map(|k| (k, now))) {
        let mut stats = STATS.lock().unwrap_or_else(|e| e.into_inner());
        stats.entry(key).or_default().nanos += now.duration_since(since).as_nanos() as u64;
    }
}

/// Starts (or stops) counting.
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed)
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The counts so far, keyed by (kind, name) — kinds: unary, binary, affine, cast, reduce, cmp,
/// where, index, matmul, copy, custom, inplace, alloc, transfer — and clears them (timing: after
/// waiting for the last operation, which closes its interval).
pub fn take() -> Vec<(Key, OpStat)> {
    clock(None);
    let mut stats = STATS.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *stats).into_iter().collect()
}

/// Runs `f` without counting on this thread: for work that another backend does not do, such as a
/// CPU twin of a CUDA kernel reading its auxiliary tensors to the host.
pub fn uncounted<R>(f: impl FnOnce() -> R) -> R {
    PAUSED.with(|p| p.set(p.get() + 1));
    let r = f();
    PAUSED.with(|p| p.set(p.get() - 1));
    r
}

/// Counts one operation that another crate dispatches itself (a custom op whose work is a
/// matrix product: kind "matmul", with its flops), usually inside [`uncounted`] around the op.
pub fn record_op(kind: &'static str, name: &'static str, bytes: usize, flops: usize) {
    record(kind, name, bytes, flops)
}

/// Adds the flops of tensor-core work a custom op does (an attention kernel's products) to its
/// counts (kind "custom", the op's name), without counting another operation.
pub fn record_flops(kind: &'static str, name: &'static str, flops: usize) {
    if !ON.load(Ordering::Relaxed) || PAUSED.with(|p| p.get()) > 0 {
        return;
    }
    let mut stats = STATS.lock().unwrap_or_else(|e| e.into_inner());
    stats.entry((kind, name)).or_default().flops += flops as u64;
}

#[inline]
pub(crate) fn record(kind: &'static str, name: &'static str, bytes: usize, flops: usize) {
    if !ON.load(Ordering::Relaxed) || PAUSED.with(|p| p.get()) > 0 {
        return;
    }
    if let Some((k, n)) = trace() {
        if k == kind && n.as_deref().is_none_or(|n| n == name) {
            eprintln!("op_stats: {kind} {name} ({bytes} bytes)\n{}", std::backtrace::Backtrace::force_capture());
        }
    }
    clock(Some((kind, name)));
    let mut stats = STATS.lock().unwrap_or_else(|e| e.into_inner());
    let s = stats.entry((kind, name)).or_default();
    s.calls += 1;
    s.bytes += bytes as u64;
    s.flops += flops as u64;
}

fn trace() -> Option<&'static (String, Option<String>)> {
    static TRACE: OnceLock<Option<(String, Option<String>)>> = OnceLock::new();
    TRACE
        .get_or_init(|| {
            let v = std::env::var("CANDLE_OP_STATS_TRACE").ok()?;
            let (k, n) = match v.split_once(':') {
                Some((k, n)) => (k.to_string(), Some(n.to_string())),
                None => (v, None),
            };
            Some((k, n))
        })
        .as_ref()
}

/// Bytes an operation reads through `layout`: the elements it addresses (dimensions of stride 0
/// are broadcasts and count once).
pub(crate) fn read_bytes(layout: &Layout, dtype: DType) -> usize {
    let elems: usize = layout.dims().iter().zip(layout.stride()).filter(|(_, s)| **s != 0).map(|(d, _)| *d).product();
    elems * dtype.size_in_bytes()
}

/// Bytes of a contiguous result of `layout`'s shape.
pub(crate) fn out_bytes(layout: &Layout, dtype: DType) -> usize {
    layout.shape().elem_count() * dtype.size_in_bytes()
}
