//! 2-D convolution without im2col, for the 3×3 (stride 1, padding 1) and 1×1 kernels that
//! make up almost all of the UNet's and the VAE's convolution FLOPs.
//!
//! A 3×3 convolution over an input padded once to (H+2)×(W+2) is nine accumulating matrix
//! products: for tap (dy, dx) the shifted input is the padded buffer read from offset
//! dy·(W+2)+dx as a [Cin × H·(W+2)] matrix, so the gemm crate reads it through strides
//! with no copy. The output is computed (W+2) wide and its two extra columns are dropped.
//! The batch is laid out inside each channel's row, so one product per tap covers it, and
//! the weights are read through their strides: stored `[Cout,3,3,Cin]` (as
//! `models::layers::Conv2d` keeps them) each tap's [Cout × Cin] matrix has unit column stride.
//! At the smallest resolutions the products are too thin for that to pay, and one im2col
//! product with K = 9·Cin over the whole batch is faster.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{f32_slice, unsupported};
use crate::Result;

/// conv2d(x, weight) + bias with candle's semantics (`x` `[B,Cin,H,W]`, `weight`
/// `[Cout,Cin,k,k]`), using the direct kernel where it applies and candle's conv otherwise.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, _, kh, kw) = weight.dims4()?;
    let direct = x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && weight.dtype() == candle_core::DType::F32
        && stride == 1
        && kh == kw
        && ((kh == 3 && padding == 1) || (kh == 1 && padding == 0));
    if !direct {
        let y = x.conv2d(weight, padding, stride, 1, 1)?;
        return Ok(match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            None => y,
        });
    }
    let x = x.contiguous()?;
    let bias = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(weight.dim(0)?, weight.dtype(), weight.device())?,
    };
    Ok(x.apply_op3_no_bwd(weight, &bias, &DirectConv)?)
}

struct DirectConv;

/// A weight tensor read through its strides: element [co, ci, dy, dx] is at
/// co·out_stride + ci·in_stride + dy·tap_strides.0 + dx·tap_strides.1.
struct Weights<'a> {
    data: &'a [f32],
    out_stride: isize,
    in_stride: isize,
    tap_strides: (usize, usize),
}

impl CustomOp3 for DirectConv {
    fn name(&self) -> &'static str {
        "direct-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let err = || unsupported("direct-conv2d");
        let x = f32_slice(xs, xl).ok_or_else(err)?;
        let w = match ws {
            CpuStorage::F32(data) => data.get(wl.start_offset()..).ok_or_else(err)?,
            _ => return Err(err()),
        };
        let st = wl.stride();
        let w = Weights {
            data: w,
            out_stride: st[0] as isize,
            in_stride: st[1] as isize,
            tap_strides: (st[2], st[3]),
        };
        let bias = f32_slice(bs, bl).ok_or_else(err)?;
        let (b, cin, h, wd) = xl.shape().dims4()?;
        let (cout, _, k, _) = wl.shape().dims4()?;
        let out = if k == 3 {
            conv3x3(x, &w, bias, [b, cin, h, wd, cout])
        } else {
            conv1x1(x, &w, bias, [b, cin, h * wd, cout])
        };
        Ok((CpuStorage::F32(out), Shape::from((b, cout, h, wd))))
    }
}

fn threads() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads())
}

/// `dims` = [batch, Cin, H, W, Cout]; weights [Cout, Cin, 3, 3].
fn conv3x3(x: &[f32], w: &Weights, bias: &[f32], dims: [usize; 5]) -> Vec<f32> {
    let [batch, cin, h, wd, cout] = dims;
    let pw = wd + 2;
    // Each padded image is followed by two spare elements, so a tap's read of H·(W+2)
    // elements from offset ≤ 2·(W+2)+2 ends inside its own image's slot.
    let plane = (h + 2) * pw + 2;
    let row = batch * plane;
    // Columns: all of image 0's slot, …, then the first H·(W+2) of the last image's.
    let n = (batch - 1) * plane + h * pw;
    let mut padded = vec![0f32; cin * row];
    padded
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(slot, dst)| {
            let (ci, bi) = (slot / batch, slot % batch);
            let src = &x[(bi * cin + ci) * h * wd..][..h * wd];
            for (y, line) in src.chunks(wd).enumerate() {
                dst[(y + 1) * pw + 1..][..wd].copy_from_slice(line);
            }
        });
    if h * wd <= SMALL_IMAGE {
        return small_conv3x3(&padded, w, bias, dims);
    }
    let mut wide = vec![0f32; cout * row];
    for tap in 0..9 {
        let (dy, dx) = (tap / 3, tap % 3);
        let w_at = dy * w.tap_strides.0 + dx * w.tap_strides.1;
        // SAFETY: dst is cout×n inside cout×row; lhs reads w[co, ci, dy, dx] through the
        // weight strides; rhs reads padded[ci·row + dy·pw + dx + j] for j < n, whose largest
        // index (cin-1)·row + (batch-1)·plane + plane - 1 is inside cin·row.
        unsafe {
            gemm::gemm(
                cout,
                n,
                cin,
                wide.as_mut_ptr(),
                1,
                row as isize,
                tap > 0,
                w.data.as_ptr().add(w_at),
                w.in_stride,
                w.out_stride,
                padded.as_ptr().add(dy * pw + dx),
                1,
                row as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                threads(),
            );
        }
    }
    let mut out = vec![0f32; batch * cout * h * wd];
    out.par_chunks_mut(h * wd)
        .enumerate()
        .for_each(|(slot, dst)| {
            let (bi, co) = (slot / cout, slot % cout);
            let src = &wide[co * row + bi * plane..][..h * pw];
            let bv = bias[co];
            for (drow, srow) in dst.chunks_mut(wd).zip(src.chunks(pw)) {
                for (d, s) in drow.iter_mut().zip(srow) {
                    *d = s + bv;
                }
            }
        });
    out
}

/// Images of at most this many pixels go through [`small_conv3x3`].
const SMALL_IMAGE: usize = 1024;

/// The im2col form for small images: columns [(tap, ci) × (b, pixel)] gathered from the
/// padded input, one product, then scattered to [B, Cout, H, W] with the bias.
fn small_conv3x3(padded: &[f32], w: &Weights, bias: &[f32], dims: [usize; 5]) -> Vec<f32> {
    let [batch, cin, h, wd, cout] = dims;
    let (pw, hw) = (wd + 2, h * wd);
    let plane = (h + 2) * pw + 2;
    let n = batch * hw;
    let mut cols = vec![0f32; 9 * cin * n];
    cols.par_chunks_mut(n).enumerate().for_each(|(r, dst)| {
        let (tap, ci) = (r / cin, r % cin);
        let (dy, dx) = (tap / 3, tap % 3);
        for (bi, img) in dst.chunks_mut(hw).enumerate() {
            let src = &padded[(ci * batch + bi) * plane..][..plane];
            for (y, line) in img.chunks_mut(wd).enumerate() {
                line.copy_from_slice(&src[(y + dy) * pw + dx..][..wd]);
            }
        }
    });
    let mut prod = vec![0f32; cout * n];
    for tap in 0..9 {
        let w_at = (tap / 3) * w.tap_strides.0 + (tap % 3) * w.tap_strides.1;
        // SAFETY: dst cout×n, lhs the tap's cout×cin weights through their strides, rhs the
        // tap's cin×n block of `cols`; all in bounds.
        unsafe {
            gemm::gemm(
                cout,
                n,
                cin,
                prod.as_mut_ptr(),
                1,
                n as isize,
                tap > 0,
                w.data.as_ptr().add(w_at),
                w.in_stride,
                w.out_stride,
                cols.as_ptr().add(tap * cin * n),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                threads(),
            );
        }
    }
    let mut out = vec![0f32; batch * cout * hw];
    out.par_chunks_mut(hw).enumerate().for_each(|(slot, dst)| {
        let (bi, co) = (slot / cout, slot % cout);
        for (d, s) in dst.iter_mut().zip(&prod[co * n + bi * hw..][..hw]) {
            *d = s + bias[co];
        }
    });
    out
}

/// `dims` = [batch, Cin, H·W, Cout]; weights [Cout, Cin, 1, 1].
fn conv1x1(x: &[f32], w: &Weights, bias: &[f32], dims: [usize; 4]) -> Vec<f32> {
    let [batch, cin, hw, cout] = dims;
    let mut out = vec![0f32; batch * cout * hw];
    for (bi, ob) in out.chunks_mut(cout * hw).enumerate() {
        for (row, &bv) in ob.chunks_mut(hw).zip(bias) {
            row.fill(bv);
        }
        // SAFETY: dst cout×hw and rhs cin×hw row-major, lhs cout×cin through the weight
        // strides, all in bounds.
        unsafe {
            gemm::gemm(
                cout,
                hw,
                cin,
                ob.as_mut_ptr(),
                1,
                hw as isize,
                true,
                w.data.as_ptr(),
                w.in_stride,
                w.out_stride,
                x.as_ptr().add(bi * cin * hw),
                1,
                hw as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                threads(),
            );
        }
    }
    out
}
