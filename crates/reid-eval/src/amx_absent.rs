//! AMX where the target has none: never usable (see the x86-64 `amx.rs`).

/// Never: this target has no AMX.
pub fn usable() -> bool {
    false
}

/// Unused: the f32 GEMM's range is everything.
pub const NORM_RANGE: (f64, f64) = (0.0, 0.0);

/// Unused where [`usable`] is false.
pub fn relative_bound(_dim: usize) -> f64 {
    f64::INFINITY
}

/// Never called where [`usable`] is false.
pub fn dot_tile(_q: &[f32], _g: &[f32], _dim: usize, _out: &mut [f32]) {
    unreachable!("AMX on a target without it")
}
