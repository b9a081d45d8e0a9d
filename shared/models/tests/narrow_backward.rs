//! The vendored candle-core's backward of `narrow` (vendor/README.md): a narrow's gradient is
//! added into its slice of the input's gradient instead of being padded with zeros to the full
//! shape. Gradients of splits, overlapping slices and mixed uses against their closed forms.

use candle_core::{Device, Tensor, Var};

fn grad_of(x: &Var, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Vec<Vec<f32>> {
    let grads = f(x.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    grads.get(x.as_tensor()).expect("a gradient").to_vec2().unwrap()
}

#[test]
fn narrow_gradients_add_into_their_slices() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::arange(0f32, 24.0, &dev).unwrap().reshape((4, 6)).unwrap()).unwrap();
    // A split into three (as query, key, value): each slice's gradient is its own factor.
    let g = grad_of(&x, |x| {
        let parts: Vec<Tensor> = (0..3).map(|i| x.narrow(1, 2 * i, 2)).collect::<candle_core::Result<_>>()?;
        (&parts[0] * 1.0)? + (&parts[1] * 2.0)? + (&parts[2] * 3.0)?
    });
    assert!(g.iter().all(|row| row == &[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]), "{g:?}");
    // Overlapping slices, a whole use and a slice of a slice: the contributions add up.
    let g = grad_of(&x, |x| {
        let a = (x.narrow(1, 0, 4)? * 2.0)?.sum_keepdim(1)?;
        let b = (x.narrow(1, 3, 3)? * 5.0)?.sum_keepdim(1)?;
        let c = x.narrow(1, 1, 4)?.narrow(1, 1, 2)?.sum_keepdim(1)?;
        let d = x.sqr()?.sum_keepdim(1)?;
        a + b + c + d
    });
    for (r, row) in g.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            let x = (r * 6 + c) as f32;
            let want = 2.0 * x
                + if c < 4 { 2.0 } else { 0.0 }
                + if c >= 3 { 5.0 } else { 0.0 }
                + if (2..4).contains(&c) { 1.0 } else { 0.0 };
            assert_eq!(*v, want, "row {r} column {c}: {g:?}");
        }
    }
    // Rows (dimension 0), the whole tensor as a narrow, and a narrow whose input's gradient was
    // first stored from another use (shared with it, so not updated in place).
    let g = grad_of(&x, |x| {
        let y = (x * 3.0)?;
        let top = y.narrow(0, 0, 1)?.broadcast_as((4, 6))?.contiguous()?;
        (&y + y.narrow(0, 0, 4)?)? + top + y.narrow(0, 2, 2)?.sum_keepdim(0)?.broadcast_as((4, 6))?
    });
    let want = |r: usize| 3.0 * (2.0 + if r == 0 { 4.0 } else { 0.0 } + if r >= 2 { 4.0 } else { 0.0 });
    for (r, row) in g.iter().enumerate() {
        assert!(row.iter().all(|v| *v == want(r)), "row {r}: {row:?}");
    }
    // A sum hands both its operands one gradient; a narrow of one operand must not write into
    // it (the other operand's gradient, here the variable's own, would change with it).
    for order in [false, true] {
        let g = grad_of(&x, |x| {
            let t = (x * 2.0)?;
            let slice = t.narrow(1, 0, 2)?.affine(4.0, 0.0)?.affine(0.5, 0.0)?.sum_keepdim(1)?;
            let both = (&t + x)?;
            if order {
                slice.broadcast_add(&both)
            } else {
                both.broadcast_add(&slice)
            }
        });
        for row in &g {
            assert_eq!(row, &[3.0 + 6.0 * 4.0, 3.0 + 6.0 * 4.0, 3.0, 3.0, 3.0, 3.0], "{g:?}");
        }
    }
}
