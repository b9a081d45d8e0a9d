//! Where models run and in what precision: the `--device` / `--precision` values both services and
//! the CLI take, parsed in one place.

use crate::{ModelError, Result};
use candle_core::{DType, Device};

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`. A CUDA device in a binary built without the `cuda`
/// feature, or on a machine without that GPU, is an error that says so.
pub fn parse_device(spec: &str) -> Result<Device> {
    let bad = |message: String| ModelError::Invalid { path: "--device".into(), message };
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "" | "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => {
                    n.parse::<usize>().map_err(|_| bad(format!("'{spec}': expected cuda:N with N a GPU index")))?
                }
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(bad(format!(
                    "'{spec}': this binary was built without CUDA support (rebuild with `--features cuda`, see scripts/cuda-toolkit.sh)"
                )));
            }
            let device = Device::new_cuda(ordinal).map_err(|e| bad(format!("'{spec}': {e}")))?;
            prepare_cuda(&device);
            Ok(device)
        }
        _ => Err(bad(format!("'{spec}': expected cpu, cuda or cuda:N"))),
    }
}

/// Settings for a CUDA device, once, as it is opened:
/// - Event tracking off. cudarc records a CUDA event on every tensor a kernel reads or writes, so
///   that tensors shared between streams are safe; candle runs everything of a device on one
///   stream, where the stream's order already guarantees it, and the events cost host time on
///   every launch. `DISTILL_CUDA_EVENT_TRACKING=1` keeps them.
/// - `DISTILL_TF32=1` lets f32 matmuls use TF32 tensor cores (as PyTorch's `allow_tf32`); off by
///   default, so fp32 means fp32.
#[allow(unused_variables)]
fn prepare_cuda(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        if std::env::var("DISTILL_CUDA_EVENT_TRACKING").map_or(true, |v| v != "1") {
            // SAFETY: one stream per device (candle's); see above.
            unsafe { cuda.disable_event_tracking() };
        }
        if std::env::var("DISTILL_TF32").is_ok_and(|v| v == "1") {
            candle_core::cuda::set_gemm_reduced_precision_f32(true);
        }
    }
}

/// Training precision: `fp32` (everything in f32) or `bf16` (mixed: f32 master weights, optimizer
/// state and objective math; matmuls in bf16, as PyTorch's autocast). Returns the autocast dtype.
pub fn parse_precision(spec: &str) -> Result<Option<DType>> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "" | "fp32" | "f32" => Ok(None),
        "bf16" => Ok(Some(DType::BF16)),
        other => {
            Err(ModelError::Invalid { path: "precision".into(), message: format!("'{other}': expected fp32 or bf16") })
        }
    }
}

/// A device's name as the flags spell it.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_precisions_parse_or_say_why_not() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("").unwrap().is_cpu());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("cuda:N"), "{e}");
        if !candle_core::utils::cuda_is_available() {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("built without CUDA"), "{e}");
        }
        assert_eq!(parse_precision("fp32").unwrap(), None);
        assert_eq!(parse_precision("bf16").unwrap(), Some(DType::BF16));
        assert!(parse_precision("fp8").unwrap_err().to_string().contains("expected fp32 or bf16"));
        assert_eq!(device_name(&Device::Cpu), "cpu");
    }
}
