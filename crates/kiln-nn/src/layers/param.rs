//! A trainable tensor with its gradient, and an Adam / AdamW optimiser over a set of them.
use crate::backend::{download_all, Backend};
use crate::optim::AdamConfig;
use kiln_tensor::{Error, Result};

/// A parameter: its value and its gradient, both in the backend's memory, and its shape.
pub struct Param<B: Backend> {
    pub value: B::Buf,
    pub grad: B::Buf,
    pub shape: Vec<usize>,
}

impl<B: Backend> Param<B> {
    /// A parameter holding `values` (host → device), gradient zero.
    pub fn new(be: &B, values: &[f32], shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(Error::shape("parameter", shape, &[values.len()]));
        }
        Ok(Param {
            value: be.upload(values)?,
            grad: be.zeros(n)?,
            shape: shape.to_vec(),
        })
    }

    /// A parameter of zeros.
    pub fn zeros(be: &B, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        Ok(Param {
            value: be.zeros(n)?,
            grad: be.zeros(n)?,
            shape: shape.to_vec(),
        })
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the value with `values` (host → device), checking the length.
    pub fn set(&mut self, be: &B, values: &[f32]) -> Result<()> {
        if values.len() != self.len() {
            return Err(Error::shape("parameter", &self.shape, &[values.len()]));
        }
        be.upload_into(values, &mut self.value, 0)
    }

    /// The value, read back to the host.
    pub fn values(&self, be: &B) -> Result<Vec<f32>> {
        download_all(be, &self.value)
    }

    /// The gradient, read back to the host.
    pub fn grads(&self, be: &B) -> Result<Vec<f32>> {
        download_all(be, &self.grad)
    }
}

/// Adam / AdamW over a fixed list of parameters: the moments live in the backend's memory,
/// the step count on the host.
pub struct Optimizer<B: Backend> {
    pub config: AdamConfig,
    /// Steps taken so far.
    pub step: u64,
    /// First and second moments, one buffer per parameter, in the parameters' order.
    pub m: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
}

impl<B: Backend> Optimizer<B> {
    /// Zero moments for parameters of the given element counts.
    pub fn new(be: &B, config: AdamConfig, sizes: &[usize]) -> Result<Self> {
        let c = &config;
        let ok = c.lr >= 0.0
            && c.eps >= 0.0
            && c.weight_decay >= 0.0
            && (0.0..1.0).contains(&c.beta1)
            && (0.0..1.0).contains(&c.beta2);
        if !ok {
            return Err(Error::invalid(format!(
                "adam: invalid hyper-parameters {c:?}"
            )));
        }
        Ok(Optimizer {
            config,
            step: 0,
            m: sizes.iter().map(|&n| be.zeros(n)).collect::<Result<_>>()?,
            v: sizes.iter().map(|&n| be.zeros(n)).collect::<Result<_>>()?,
        })
    }

    /// One update of every parameter from its gradient (same order as `new`).
    pub fn step(&mut self, be: &B, params: &mut [&mut Param<B>]) -> Result<()> {
        if params.len() != self.m.len() {
            return Err(Error::invalid(format!(
                "adam: {} parameters for a state of {}",
                params.len(),
                self.m.len()
            )));
        }
        let (mut values, grads): (Vec<&mut B::Buf>, Vec<&B::Buf>) =
            params.iter_mut().map(|p| (&mut p.value, &p.grad)).unzip();
        let mut m: Vec<&mut B::Buf> = self.m.iter_mut().collect();
        let mut v: Vec<&mut B::Buf> = self.v.iter_mut().collect();
        be.adam(
            &self.config,
            self.step + 1,
            &mut values,
            &grads,
            &mut m,
            &mut v,
        )?;
        self.step += 1;
        Ok(())
    }
}
