//! CPU kernels that candle lacks, as candle custom ops: convolution without im2col,
//! attention that never holds a full score matrix, GroupNorm fused with SiLU.
//!
//! Each public function takes ordinary tensors, runs the fast kernel for contiguous f32 on the
//! CPU and falls back to candle's own operations otherwise; the tests compare the two.

pub mod attention;
pub mod bf16;
pub mod conv;
pub mod geglu;
mod math;
pub mod norm;
pub mod widen;

use candle_core::{CpuStorage, Layout};

pub use attention::attention;
pub use conv::conv2d;
pub use geglu::geglu;
pub use norm::group_norm;

/// The f32 slice a contiguous CPU storage holds under `layout`, or `None` if it is not one.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
    let (start, end) = layout.contiguous_offsets()?;
    match storage {
        CpuStorage::F32(data) => data.get(start..end),
        _ => None,
    }
}

/// The error a kernel reports when called outside the cases its wrapper routes to it.
fn unsupported(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: needs contiguous f32 inputs on the CPU"))
}

/// A raw output pointer shared by parallel tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);

// SAFETY: every user hands each task a disjoint region of the buffer and joins before reading it.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer `offset` elements in.
    ///
    /// # Safety
    /// `offset` must stay inside the buffer.
    unsafe fn add(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// Tells glibc's allocator to keep freed memory for reuse instead of returning it to the
/// system: every denoising step frees and reallocates the same large activations, and
/// without this each one comes back as fresh zeroed pages (a fifth of a UNet step at 256²,
/// a tenth of a VAE decode at 512² in page faults when measured). Large blocks are taken
/// from the heap rather than mapped one by one, and the heap is not trimmed. Process-wide
/// and idempotent; no effect off glibc. For binaries that run models, first thing in `main`:
/// holding on to freed memory is a choice for the whole process, so the program makes it, not
/// a model constructor inside a program that may have other plans for its memory.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator tuning parameters; any value is valid.
            unsafe {
                libc::mallopt(libc::M_MMAP_MAX, 0);
                libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
                libc::mallopt(libc::M_TOP_PAD, 256 << 20);
            }
        });
    }
}

#[cfg(test)]
mod tests;
