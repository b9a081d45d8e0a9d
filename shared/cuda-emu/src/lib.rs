//! The kernels of `shared/models/src/kernels/kernels.cu` compiled as C++ for the CPU (`cpp/cuda_emu.h`
//! supplies CUDA's device built-ins: each block's threads run as OS threads, warp shuffles and
//! `__syncthreads` are barriers). Tests launch a kernel by name with the grid, block and
//! arguments the CUDA path would use and compare what it writes with the CPU implementation.
//! A dev-dependency only: nothing here runs in the services.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

/// One kernel argument, as the kernel's C signature takes it.
pub enum Arg {
    /// A device pointer: here a host buffer (`const float*` / `float*`).
    F32(*mut f32),
    /// `const uint32_t*`
    U32(*mut u32),
    /// `__nv_bfloat16*`, as raw bits
    Bf16(*mut u16),
    I64(i64),
    U64(u64),
    Float(f32),
    I32(i32),
    /// A struct passed by value (kernels.cu's `DistillTensorList`), as 8-byte words.
    Struct(Vec<u64>),
}

impl Arg {
    fn code(&self) -> char {
        match self {
            Arg::F32(_) => 'f',
            Arg::U32(_) => 'u',
            Arg::Bf16(_) => 'h',
            Arg::I64(_) => 'L',
            Arg::U64(_) => 'U',
            Arg::Float(_) => 'F',
            Arg::I32(_) => 'I',
            Arg::Struct(_) => 'T',
        }
    }

    fn ptr(&mut self) -> *mut c_void {
        match self {
            Arg::F32(p) => p as *mut *mut f32 as *mut c_void,
            Arg::U32(p) => p as *mut *mut u32 as *mut c_void,
            Arg::Bf16(p) => p as *mut *mut u16 as *mut c_void,
            Arg::I64(v) => v as *mut i64 as *mut c_void,
            Arg::U64(v) => v as *mut u64 as *mut c_void,
            Arg::Float(v) => v as *mut f32 as *mut c_void,
            Arg::I32(v) => v as *mut i32 as *mut c_void,
            Arg::Struct(words) => words.as_mut_ptr() as *mut c_void,
        }
    }
}

extern "C" {
    fn distill_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        signature: *const c_char,
        params: *mut *mut c_void,
    ) -> c_int;
    fn distill_emu_error() -> *const c_char;
}

/// Runs `kernel` over `grid` x `block` threads with `args`. An unknown kernel or arguments of
/// the wrong types (checked against the kernel's C signature) are an error.
///
/// # Safety
/// The pointers must cover every element the kernel reads or writes with these arguments.
pub unsafe fn launch(kernel: &str, grid: [u32; 3], block: [u32; 3], mut args: Vec<Arg>) -> Result<(), String> {
    let name = CString::new(kernel).map_err(|e| e.to_string())?;
    let signature = CString::new(args.iter().map(Arg::code).collect::<String>()).map_err(|e| e.to_string())?;
    let mut params: Vec<*mut c_void> = args.iter_mut().map(Arg::ptr).collect();
    let rc = distill_emu_launch(name.as_ptr(), grid.as_ptr(), block.as_ptr(), signature.as_ptr(), params.as_mut_ptr());
    if rc == 0 {
        Ok(())
    } else {
        Err(CStr::from_ptr(distill_emu_error()).to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_runs_and_wrong_arguments_are_refused() {
        // GELU over 1,000 elements with 4 blocks of 256 threads, as the CUDA path launches it.
        let mut x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 100.0).collect();
        let mut y = vec![f32::NAN; 1000];
        let args = vec![Arg::F32(x.as_mut_ptr()), Arg::F32(y.as_mut_ptr()), Arg::I64(1000)];
        unsafe { launch("distill_gelu_erf_f32", [4, 1, 1], [256, 1, 1], args) }.unwrap();
        for (x, y) in x.iter().zip(&y) {
            let want = 0.5 * x * (1.0 + libm_erf(x / std::f32::consts::SQRT_2));
            assert!((y - want).abs() < 1e-6, "gelu({x}) = {y}, want {want}");
        }
        let wrong = vec![Arg::F32(x.as_mut_ptr()), Arg::F32(y.as_mut_ptr()), Arg::Float(1000.0)];
        let err = unsafe { launch("distill_gelu_erf_f32", [4, 1, 1], [256, 1, 1], wrong) }.unwrap_err();
        assert!(err.contains("takes (ffL), launched with (ffF)"), "{err}");
        let err = unsafe { launch("no_such_kernel", [1, 1, 1], [32, 1, 1], vec![]) }.unwrap_err();
        assert!(err.contains("no kernel named no_such_kernel"), "{err}");
    }

    #[test]
    fn warp_reductions_meet_across_lanes() {
        // Softmax rows of 100 columns, one warp per row, 4 warps per block, 10 rows: the last
        // block has two rows and two idle warps that return at once.
        let (rows, cols) = (10usize, 100usize);
        let mut x: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32) / 17.0).collect();
        let mut y = vec![f32::NAN; rows * cols];
        let args =
            vec![Arg::F32(x.as_mut_ptr()), Arg::F32(y.as_mut_ptr()), Arg::I64(rows as i64), Arg::I64(cols as i64)];
        unsafe { launch("distill_softmax_f32", [3, 1, 1], [128, 1, 1], args) }.unwrap();
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = row.iter().map(|v| (v - m).exp()).sum();
            for c in 0..cols {
                let want = (row[c] - m).exp() / s;
                assert!((y[r * cols + c] - want).abs() < 1e-6, "row {r} col {c}");
            }
        }
    }

    /// The ThreadSanitizer build (`DISTILL_EMU_TSAN=1`, scripts/test.sh) reports both kinds of
    /// race a GPU has: blocks adding to one element without an atomic, and threads reading
    /// shared memory another wrote with no barrier between (a shuffle is none). Each runs in a
    /// child process, which must exit with the sanitizer's status and name the kernel.
    #[cfg(emu_tsan)]
    #[test]
    fn races_are_reported() {
        for kernel in ["emu_race_between_blocks", "emu_race_without_barrier", "emu_race_across_shuffle"] {
            let (status, stderr) = run_faulty(kernel);
            assert_eq!(status.code(), Some(66), "{kernel}: {stderr}");
            assert!(stderr.contains("ThreadSanitizer: data race") && stderr.contains(kernel), "{kernel}: {stderr}");
        }
    }

    /// The AddressSanitizer build (`DISTILL_EMU_ASAN=1`, scripts/test.sh) reports a kernel that
    /// reads one element past its buffer (in a child process), which the plain emulator would
    /// read from whatever lies there.
    #[cfg(emu_asan)]
    #[test]
    fn out_of_bounds_is_reported() {
        let (status, stderr) = run_faulty("emu_out_of_bounds");
        assert!(!status.success(), "{stderr}");
        assert!(
            stderr.contains("AddressSanitizer: heap-buffer-overflow") && stderr.contains("emu_out_of_bounds"),
            "{stderr}"
        );
    }

    /// Threads of a block at different `__syncthreads`, which CUDA does not allow (a GPU may
    /// hang): the emulator names both calls and aborts (in a child process).
    #[test]
    fn divergent_syncthreads_aborts() {
        let (status, stderr) = run_faulty("emu_divergent_syncthreads");
        assert!(!status.success(), "{stderr}");
        // races.cu's two calls in that kernel, in either order.
        let source = include_str!("../cpp/races.cu");
        let kernel = source.find("emu_divergent_syncthreads").unwrap();
        let first = source[..kernel].lines().count();
        let calls: Vec<usize> = (source[kernel..].lines().enumerate())
            .filter(|(_, l)| l.trim() == "__syncthreads();")
            .map(|(i, _)| first + i)
            .take(2)
            .collect();
        assert!(stderr.contains("threads of a block at different __syncthreads (line "), "{stderr}");
        for line in calls {
            assert!(stderr.contains(&format!("line {line} column")), "line {line}: {stderr}");
        }
    }

    /// Runs one of races.cu's kernels in a child process (this test binary again, its
    /// `faulty_kernel`): its exit status and what it printed.
    fn run_faulty(kernel: &str) -> (std::process::ExitStatus, String) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::faulty_kernel", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("DISTILL_EMU_FAULTY_KERNEL", kernel)
            .output()
            .unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The kernel with a mistake that `races_are_reported`, `out_of_bounds_is_reported` or
    /// `divergent_syncthreads_aborts` names, launched as it would be (one block unless it races
    /// between blocks).
    #[test]
    #[ignore = "run by the tests of the emulator's checks, in a child process"]
    fn faulty_kernel() {
        let kernel = std::env::var("DISTILL_EMU_FAULTY_KERNEL").expect("DISTILL_EMU_FAULTY_KERNEL");
        let mut out = vec![0f32; 64];
        let blocks = if kernel == "emu_race_between_blocks" { 4 } else { 1 };
        unsafe { launch(&kernel, [blocks, 1, 1], [64, 1, 1], vec![Arg::F32(out.as_mut_ptr())]) }.unwrap();
    }

    /// erf from the C library the kernels call, as the reference.
    fn libm_erf(x: f32) -> f32 {
        extern "C" {
            fn erff(x: f32) -> f32;
        }
        unsafe { erff(x) }
    }
}
