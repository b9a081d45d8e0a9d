//! The operation counts `distill-bench --op-stats` reports (the vendored candle-core's `op_stats`):
//! one test in its own binary, since the counter is global and other tests' operations would mix in.

use candle_core::op_stats::{self, OpStat};
use candle_core::{DType, Device, Tensor};

fn stat(ops: &[((&str, &str), OpStat)], kind: &str, name: &str) -> OpStat {
    ops.iter().find(|((k, n), _)| *k == kind && *n == name).map(|(_, s)| *s).unwrap_or_default()
}

#[test]
fn counts_operations_bytes_and_matmul_flops() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let a = Tensor::arange(0f32, 6.0, &dev)?.reshape((2, 3))?;
    let b = Tensor::arange(0f32, 12.0, &dev)?.reshape((3, 4))?;
    let bias = Tensor::arange(0f32, 4.0, &dev)?;
    // Nothing is counted while off.
    a.matmul(&b)?;
    assert!(op_stats::take().is_empty());

    op_stats::set_enabled(true);
    let c = a.matmul(&b)?; // [2, 4]
    let d = c.broadcast_add(&bias)?; // the bias is read once: stride 0 over the rows
    let e = d.to_dtype(DType::BF16)?;
    let s = d.sum_keepdim(0)?; // [1, 4]
    let t = d.t()?.contiguous()?; // a strided copy
    let host = e.to_vec2::<half::bf16>()?;
    op_stats::set_enabled(false);
    let ops = op_stats::take();
    assert_eq!((host.len(), s.dims(), t.dims()), (2, &[1, 4][..], &[4, 2][..]));

    assert_eq!(
        stat(&ops, "matmul", "f32"),
        OpStat { calls: 1, bytes: (6 + 12 + 8) * 4, flops: 2 * 2 * 4 * 3, nanos: 0 }
    );
    assert_eq!(stat(&ops, "binary", "add"), OpStat { calls: 1, bytes: (8 + 4 + 8) * 4, flops: 0, nanos: 0 });
    assert_eq!(stat(&ops, "cast", "bf16"), OpStat { calls: 1, bytes: 8 * 4 + 8 * 2, flops: 0, nanos: 0 });
    assert_eq!(stat(&ops, "reduce", "sum"), OpStat { calls: 1, bytes: 8 * 4 + 4 * 4, flops: 0, nanos: 0 });
    assert_eq!(stat(&ops, "copy", "strided"), OpStat { calls: 1, bytes: 2 * 8 * 4, flops: 0, nanos: 0 });
    assert_eq!(stat(&ops, "transfer", "device-to-host"), OpStat { calls: 1, bytes: 8 * 2, flops: 0, nanos: 0 });
    assert_eq!(ops.iter().map(|(_, s)| s.calls).sum::<u64>(), 6, "{ops:?}");
    assert!(op_stats::take().is_empty(), "take clears the counts");

    // Timed: a wait for the device before each counted operation and at `take`, the interval
    // since the previous one going to that one (here the CPU's own time: a 256^3 product against
    // an add of four numbers).
    let waits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = waits.clone();
    op_stats::set_timing(Some(Box::new(move || {
        w.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    })));
    let big = Tensor::ones((256, 256), DType::F32, &dev)?;
    let start = std::time::Instant::now();
    op_stats::set_enabled(true);
    let m = big.matmul(&big)?;
    let small = (&bias + &bias)?;
    op_stats::set_enabled(false);
    let ops = op_stats::take();
    let wall = start.elapsed().as_nanos() as u64;
    op_stats::set_timing(None);
    assert_eq!((m.dims(), small.dims()), (&[256, 256][..], &[4][..]));
    assert_eq!(waits.load(std::sync::atomic::Ordering::Relaxed), 3, "one wait per operation and one at take");
    // While timing, a product is named with its shape (b x m x n x k).
    let (mm, add) = (stat(&ops, "matmul", "f32 1x256x256x256"), stat(&ops, "binary", "add"));
    assert_eq!((mm.calls, add.calls), (1, 1));
    assert!(mm.nanos > 10 * add.nanos && add.nanos > 0, "{mm:?} {add:?}");
    assert!(mm.nanos + add.nanos <= wall, "{mm:?} {add:?} in {wall} ns");
    // Off again: no times, no waits.
    op_stats::set_enabled(true);
    (&bias + &bias)?;
    op_stats::set_enabled(false);
    assert_eq!(stat(&op_stats::take(), "binary", "add").nanos, 0);
    assert_eq!(waits.load(std::sync::atomic::Ordering::Relaxed), 3);
    Ok(())
}
