//! Bounds on the numbers a request may carry. Every numeric field of every spec has a maximum,
//! checked before a job is created, so that no allocation, loop or timer is ever sized by an
//! unchecked client number (a `Vec::with_capacity(4294967295)` aborts the whole process). The
//! messages name the field, its value and the bound (INVALID_ARGUMENT); docs/security.md lists them.

/// `value` of `field` must be at most `max`.
pub fn at_most(field: &str, value: u64, max: u64) -> Result<(), String> {
    if value > max {
        return Err(format!("{field}: {value} is above the bound {max}"));
    }
    Ok(())
}

/// `value` of `field` must be finite and within `min..=max`.
pub fn within(field: &str, value: f64, min: f64, max: f64) -> Result<(), String> {
    if !value.is_finite() || value < min || value > max {
        return Err(format!("{field}: {value} is outside [{min}, {max}]"));
    }
    Ok(())
}

/// Tokens one forward pass may hold (pairs x tokens per pair): larger batches are split by the
/// caller (gradient accumulation, more passes); the memory of a pass grows with it.
pub const MAX_TOKENS_PER_PASS: u64 = 1 << 20;
/// Token limits of one input (query, or query + passage).
pub const MAX_SEQUENCE_TOKENS: u64 = 8192;
/// Pairs per forward pass.
pub const MAX_BATCH_PAIRS: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_name_the_field_and_the_bound() {
        assert!(at_most("a", 3, 3).is_ok());
        let e = at_most("hyperparameters.shuffle_buffer", 4294967295, 1_000_000).unwrap_err();
        assert!(e.contains("hyperparameters.shuffle_buffer") && e.contains("4294967295") && e.contains("1000000"));
        assert!(within("t", f64::NAN, 0.0, 1.0).is_err());
        assert!(within("t", f64::INFINITY, 0.0, 1.0).is_err());
        assert!(within("t", 0.5, 0.0, 1.0).is_ok());
    }
}
