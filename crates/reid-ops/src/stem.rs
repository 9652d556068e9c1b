//! The stem in train mode as one op: the 7x7 convolution of the images, batch
//! norm, ReLU and the 3x3 max pool ([`Stem`]), or the last three alone
//! ([`BatchNormReluMaxPool`]). Its activations are the largest of the network,
//! and candle's backward adds every gradient it hands on to a tensor of zeros;
//! here each gradient goes straight to the next step of the backward.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor, WithDType};
use num_traits::Float;

use super::batch_norm::BatchNormTrain;
use super::conv::{forward_values, Conv2d, Conv2dBackwardWeight};
use super::pool::{MaxPool2d, Window};
use super::{contiguous, dims4};

/// `max_pool(relu(batch_norm(x)))` in train mode, from (x, weight, bias). The
/// batch statistics are left in `bn.stats`, as by [`BatchNormTrain`].
#[derive(Debug, Clone)]
pub struct BatchNormReluMaxPool {
    /// The batch norm, with `relu` set.
    pub bn: BatchNormTrain,
    pub pool: MaxPool2d,
    /// The batch norm's output, kept for the backward.
    normalised: Arc<Mutex<Option<Tensor>>>,
}

impl BatchNormReluMaxPool {
    pub fn new(bn: BatchNormTrain, window: Window) -> Self {
        BatchNormReluMaxPool {
            bn: BatchNormTrain { relu: true, ..bn },
            pool: MaxPool2d::new(window),
            normalised: Arc::new(Mutex::new(None)),
        }
    }

    fn forward<T: Float + WithDType>(&self, x: &[T], w: &[T], b: &[T], dims4: [usize; 4]) -> Result<Vec<T>> {
        let [n, c, h, wd] = dims4;
        let y = self.bn.forward(x, w, b, (n, c, h * wd));
        let pooled = self.pool.forward(&y, (n, c, h, wd));
        *self.normalised.lock().expect("normalised lock") = Some(crate::cpu_result(y, dims4.to_vec(), &Device::Cpu)?);
        Ok(pooled)
    }

    /// The output's shape for an input of shape `[n, c, h, w]`.
    fn pooled_shape(&self, [n, c, h, w]: [usize; 4]) -> Shape {
        let win = self.pool.window;
        Shape::from((n, c, win.out_len(h), win.out_len(w)))
    }
}

impl CustomOp3 for BatchNormReluMaxPool {
    fn name(&self) -> &'static str {
        "batch-norm-relu-max-pool"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims4(l1, self.name())?;
        let out = three_floats!(self.name(), (s1, l1), (s2, l2), (s3, l3), |x, wt, b| self.forward(
            x,
            wt,
            b,
            [n, c, h, w]
        )?);
        crate::ledger::cpu_output(1, Ok((out, self.pooled_shape([n, c, h, w]))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, grad, x.track_op())
    }
}

impl BatchNormReluMaxPool {
    /// The gradients of (x, weight, bias) from the pooled output's gradient;
    /// x's only when `input_grad`.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        input_grad: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let y = self.normalised.lock().expect("normalised lock").clone();
        let y = y.expect("the forward ran");
        let grad_y = self.pool.input_grad(&y, grad)?;
        self.bn.backward(x, w, &y, &grad_y, input_grad)
    }
}

/// The whole stem in train mode, from (convolution weight, batch-norm weight,
/// batch-norm bias): the op holds the images, through which nothing is trained,
/// so that the three parameters fit a three-operand op.
#[derive(Debug, Clone)]
pub struct Stem {
    pub conv: Conv2d,
    pub images: Tensor,
    pub rest: BatchNormReluMaxPool,
    /// The convolution's output, kept for the backward.
    conv_out: Arc<Mutex<Option<Tensor>>>,
}

impl Stem {
    /// The stem of `images` (which must not need a gradient).
    pub fn new(conv: Conv2d, images: Tensor, rest: BatchNormReluMaxPool) -> Self {
        Stem {
            conv,
            images,
            rest,
            conv_out: Arc::new(Mutex::new(None)),
        }
    }

    /// The pooled output from the images `x`, the convolution weight and its
    /// shape, and the batch norm's weight and bias; and the convolution output's shape.
    fn forward<T: Float + WithDType>(
        &self,
        x: &[T],
        kernel: (&[T], &[usize]),
        w: &[T],
        b: &[T],
    ) -> Result<(Vec<T>, [usize; 4])> {
        let (y, conv_dims) = forward_values((x, self.images.dims()), kernel, self.conv)?;
        let pooled = self.rest.forward(&y, w, b, conv_dims)?;
        let y = crate::cpu_result(y, conv_dims.to_vec(), &Device::Cpu)?;
        *self.conv_out.lock().expect("conv_out lock") = Some(y);
        Ok((pooled, conv_dims))
    }
}

impl CustomOp3 for Stem {
    fn name(&self) -> &'static str {
        "stem"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (images, layout) = self.images.storage_and_layout();
        let Storage::Cpu(images) = &*images else {
            candle_core::bail!("{name}: the images must be on the CPU");
        };
        let conv_dims: [usize; 4];
        let out = three_floats!(name, (s1, l1), (s2, l2), (s3, l3), |k, w, b| {
            // The images as the parameters' dtype (an error if they differ).
            let x = contiguous(images.as_slice()?, layout, name)?;
            let (pooled, dims) = self.forward(x, (k, l1.dims()), w, b)?;
            conv_dims = dims;
            pooled
        });
        crate::ledger::cpu_output(1, Ok((out, self.rest.pooled_shape(conv_dims))))
    }

    fn bwd(
        &self,
        kernel: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let y = self.conv_out.lock().expect("conv_out lock").clone();
        let y = y.expect("the forward ran");
        let (grad_y, grad_w, grad_b) = self.rest.backward(&y, w, grad, true)?;
        let op = Conv2dBackwardWeight {
            conv: self.conv,
            weight: kernel.dims4()?,
        };
        let grad_kernel = self.images.apply_op2_no_bwd(&grad_y.expect("asked for"), &op)?;
        Ok((Some(grad_kernel), grad_w, grad_b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::testing::random;

    /// The fused op against batch norm, then the pool, as separate ops: the
    /// same output and the same gradients of x, weight and bias, bit for bit.
    #[test]
    fn the_fused_stem_gives_the_bits_of_its_parts() {
        let window = Window {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let x = Var::from_tensor(&random(&[3, 4, 9, 7], 1)).unwrap();
        let w = Var::from_tensor(&random(&[4], 2)).unwrap();
        let b = Var::from_tensor(&random(&[4], 3)).unwrap();
        let bn = || BatchNormTrain {
            eps: 1e-5,
            relu: true,
            stats: Arc::new(Mutex::new(None)),
        };
        let fused = x
            .apply_op3(w.as_tensor(), b.as_tensor(), BatchNormReluMaxPool::new(bn(), window))
            .unwrap();
        let normalised = x.apply_op3(w.as_tensor(), b.as_tensor(), bn()).unwrap();
        let apart = normalised.apply_op1(MaxPool2d::new(window)).unwrap();
        let g = random(fused.dims(), 4);
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(values(&fused), values(&apart));
        let gf = (&fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let ga = (&apart * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            let (f, a) = (gf.get(v.as_tensor()).unwrap(), ga.get(v.as_tensor()).unwrap());
            assert_eq!(values(f), values(a));
        }
    }

    /// The whole stem against the convolution, then the fused rest: the same
    /// output and the same gradients of the three parameters, bit for bit.
    #[test]
    fn the_whole_stem_gives_the_bits_of_its_parts() {
        let window = Window {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let conv = Conv2d { stride: 2, padding: 3 };
        let images = random(&[2, 3, 13, 11], 5);
        let kernel = Var::from_tensor(&random(&[4, 3, 7, 7], 6)).unwrap();
        let w = Var::from_tensor(&random(&[4], 7)).unwrap();
        let b = Var::from_tensor(&random(&[4], 8)).unwrap();
        let rest = || {
            let bn = BatchNormTrain {
                eps: 1e-5,
                relu: true,
                stats: Arc::new(Mutex::new(None)),
            };
            BatchNormReluMaxPool::new(bn, window)
        };
        let whole = kernel
            .apply_op3(w.as_tensor(), b.as_tensor(), Stem::new(conv, images.clone(), rest()))
            .unwrap();
        let convolved = images.apply_op2(kernel.as_tensor(), conv).unwrap();
        let apart = convolved.apply_op3(w.as_tensor(), b.as_tensor(), rest()).unwrap();
        let g = random(whole.dims(), 9);
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(whole.dims(), apart.dims());
        assert_eq!(values(&whole), values(&apart));
        let gw = (&whole * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let ga = (&apart * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&kernel, &w, &b] {
            let (f, a) = (gw.get(v.as_tensor()).unwrap(), ga.get(v.as_tensor()).unwrap());
            assert_eq!(values(f), values(a));
        }
    }
}
