//! 2-D convolution without im2col, for the 3×3 (stride 1, padding 1) and 1×1 kernels that
//! make up almost all of the UNet's and the VAE's convolution FLOPs.
//!
//! A 3×3 convolution over an input padded once to (H+2)×(W+2) is nine accumulating matrix
//! products: for tap (dy, dx) the shifted input is the padded buffer read from offset
//! dy·(W+2)+dx as a [Cin × H·(W+2)] matrix, so the gemm crate reads it through strides
//! with no copy. The output is computed (W+2) wide and its two extra columns are dropped.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{f32_slice, unsupported};
use crate::Result;

/// conv2d(x, weight) + bias with candle's semantics (`x` [B,Cin,H,W], `weight`
/// [Cout,Cin,k,k]), using the direct kernel where it applies and candle's conv otherwise.
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
    let weight = weight.contiguous()?;
    let bias = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(weight.dim(0)?, weight.dtype(), weight.device())?,
    };
    Ok(x.apply_op3_no_bwd(&weight, &bias, &DirectConv)?)
}

struct DirectConv;

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
        let w = f32_slice(ws, wl).ok_or_else(err)?;
        let bias = f32_slice(bs, bl).ok_or_else(err)?;
        let (b, cin, h, wd) = xl.shape().dims4()?;
        let (cout, _, k, _) = wl.shape().dims4()?;
        let out = if k == 3 {
            conv3x3(x, w, bias, [b, cin, h, wd, cout])
        } else {
            conv1x1(x, w, bias, [b, cin, h * wd, cout])
        };
        Ok((CpuStorage::F32(out), Shape::from((b, cout, h, wd))))
    }
}

fn threads() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads())
}

/// `dims` = [batch, Cin, H, W, Cout]; weights [Cout, Cin, 3, 3].
fn conv3x3(x: &[f32], w: &[f32], bias: &[f32], dims: [usize; 5]) -> Vec<f32> {
    let [batch, cin, h, wd, cout] = dims;
    let pw = wd + 2;
    // Two spare elements at the end keep the last tap's strided read inside the buffer.
    let plane = (h + 2) * pw + 2;
    let n = h * pw;
    let mut padded = vec![0f32; cin * plane];
    let mut wide = vec![0f32; cout * n];
    let mut out = vec![0f32; batch * cout * h * wd];
    for bi in 0..batch {
        let xb = &x[bi * cin * h * wd..(bi + 1) * cin * h * wd];
        padded
            .par_chunks_mut(plane)
            .zip(xb.par_chunks(h * wd))
            .for_each(|(dst, src)| {
                for (y, row) in src.chunks(wd).enumerate() {
                    dst[(y + 1) * pw + 1..(y + 1) * pw + 1 + wd].copy_from_slice(row);
                }
            });
        for tap in 0..9 {
            let (dy, dx) = (tap / 3, tap % 3);
            // SAFETY: dst is cout×n with row stride n; lhs reads w[co, ci, dy, dx] at
            // co·9Cin + ci·9 + tap; rhs reads padded[ci·plane + dy·pw + dx + j] for j < n,
            // whose largest index (cin-1)·plane + 2·pw + 2 + n - 1 < cin·plane.
            unsafe {
                gemm::gemm(
                    cout,
                    n,
                    cin,
                    wide.as_mut_ptr(),
                    1,
                    n as isize,
                    tap > 0,
                    w.as_ptr().add(tap),
                    9,
                    (cin * 9) as isize,
                    padded.as_ptr().add(dy * pw + dx),
                    1,
                    plane as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    threads(),
                );
            }
        }
        out[bi * cout * h * wd..(bi + 1) * cout * h * wd]
            .par_chunks_mut(h * wd)
            .zip(wide.par_chunks(n))
            .zip(bias.par_iter())
            .for_each(|((dst, src), &bv)| {
                for (drow, srow) in dst.chunks_mut(wd).zip(src.chunks(pw)) {
                    for (d, s) in drow.iter_mut().zip(srow) {
                        *d = s + bv;
                    }
                }
            });
    }
    out
}

/// `dims` = [batch, Cin, H·W, Cout]; weights [Cout, Cin, 1, 1].
fn conv1x1(x: &[f32], w: &[f32], bias: &[f32], dims: [usize; 4]) -> Vec<f32> {
    let [batch, cin, hw, cout] = dims;
    let mut out = vec![0f32; batch * cout * hw];
    for (bi, ob) in out.chunks_mut(cout * hw).enumerate() {
        for (row, &bv) in ob.chunks_mut(hw).zip(bias) {
            row.fill(bv);
        }
        // SAFETY: dst cout×hw, lhs cout×cin, rhs cin×hw, all row-major and in bounds.
        unsafe {
            gemm::gemm(
                cout,
                hw,
                cin,
                ob.as_mut_ptr(),
                1,
                hw as isize,
                true,
                w.as_ptr(),
                1,
                cin as isize,
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
