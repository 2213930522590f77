//! The 32-bit Mersenne Twister as torch's CPU generator runs it (`at::mt19937`).

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// MT19937 state: 624 words and the index of the next one to temper.
#[derive(Clone)]
pub(crate) struct Mt19937 {
    state: Box<[u32; N]>,
    next: usize,
}

impl Mt19937 {
    /// Standard initialisation from the low 32 bits of `seed`, as `manual_seed` does.
    pub(crate) fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; N]);
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        // The state is regenerated before the first draw, like torch's `left_ = 1`.
        Self { state, next: N }
    }

    /// The next tempered 32-bit output.
    pub(crate) fn next_u32(&mut self) -> u32 {
        if self.next == N {
            self.regenerate();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn regenerate(&mut self) {
        let s = &mut self.state;
        for i in 0..N {
            let mixed = (s[i] & UPPER_MASK) | (s[(i + 1) % N] & LOWER_MASK);
            let twisted = (mixed >> 1) ^ if s[(i + 1) % N] & 1 == 1 { MATRIX_A } else { 0 };
            s[i] = s[(i + M) % N] ^ twisted;
        }
        self.next = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_outputs_for_seed_5489_are_the_reference_ones() {
        let mut mt = Mt19937::new(5489);
        let got: Vec<u32> = (0..5).map(|_| mt.next_u32()).collect();
        assert_eq!(
            got,
            [3499211612, 581869302, 3890346734, 3586334585, 545404204]
        );
    }

    #[test]
    fn ten_thousandth_output_for_seed_5489_is_the_reference_one() {
        // The C++ standard fixes this value for std::mt19937 (default seed 5489).
        let mut mt = Mt19937::new(5489);
        let last = (0..10_000).map(|_| mt.next_u32()).last();
        assert_eq!(last, Some(4_123_659_995));
    }

    #[test]
    fn seed_uses_only_low_32_bits() {
        let mut a = Mt19937::new(5);
        let mut b = Mt19937::new((1u64 << 32) + 5);
        assert!((0..700).all(|_| a.next_u32() == b.next_u32()));
    }
}
