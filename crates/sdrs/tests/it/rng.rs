//! TorchGenerator against torch.randn outputs written by `tools/rng_reference.py`
//! (tests/fixtures/rng/randn.safetensors: `{variant}/seed{S}/n{N}`, `.../latent`, `.../mixed{i}`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::Device;
use safetensors::SafeTensors;
use sdrs::sampling::rng::{NormalVariant, TorchGenerator, TorchRng};
use sdrs::sampling::NoiseSource;

/// Reference draws: name -> (shape, values).
type Fixture = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn fixture() -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/rng/randn.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// Splits `avx2/seed42/n17` into (variant, seed, rest).
fn parse_name(name: &str) -> (NormalVariant, u64, &str) {
    let mut parts = name.splitn(3, '/');
    let (Some(variant), Some(seed), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("unexpected fixture name {name}");
    };
    let variant = variant.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
    let seed = seed
        .trim_start_matches("seed")
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (variant, seed, rest)
}

/// Counts bit-equal values; reports the first difference.
struct Tally {
    equal: usize,
    total: usize,
    failures: Vec<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            equal: 0,
            total: 0,
            failures: Vec::new(),
        }
    }

    fn compare(&mut self, name: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{name}: length");
        let equal = got
            .iter()
            .zip(want)
            .filter(|(g, w)| g.to_bits() == w.to_bits())
            .count();
        self.equal += equal;
        self.total += want.len();
        if let Some(i) = got
            .iter()
            .zip(want)
            .position(|(g, w)| g.to_bits() != w.to_bits())
        {
            self.failures.push(format!(
                "{name}: {} of {} differ, first at index {i}: got {:e} ({:#010x}), torch {:e} ({:#010x})",
                want.len() - equal,
                want.len(),
                got[i],
                got[i].to_bits(),
                want[i],
                want[i].to_bits()
            ));
        }
    }

    fn finish(self, what: &str) {
        println!("{what}: {} of {} values bit-equal", self.equal, self.total);
        assert!(self.total > 0, "{what}: no reference values found");
        assert!(
            self.failures.is_empty(),
            "{what}:\n{}",
            self.failures.join("\n")
        );
    }
}

fn check_single_draws(variant: NormalVariant) {
    let mut tally = Tally::new();
    for (name, (_, want)) in fixture() {
        let (v, seed, rest) = parse_name(&name);
        if v != variant || rest.starts_with("mixed") {
            continue;
        }
        let got = TorchGenerator::new(seed).randn(want.len(), variant);
        tally.compare(&name, &got, &want);
    }
    tally.finish(&format!("randn {variant}"));
}

#[test]
fn randn_matches_torch_default_capability_for_scalar_variant() {
    check_single_draws(NormalVariant::Scalar);
}

#[test]
fn randn_matches_torch_avx2_capability_for_avx2_variant() {
    check_single_draws(NormalVariant::Avx2);
}

#[test]
fn repeated_draws_from_one_generator_match_torch() {
    // `{variant}/seed{S}/mixed{i}` are successive calls on one generator, sizes given by shapes.
    let fixture = fixture();
    let starts: Vec<(NormalVariant, u64)> = fixture
        .keys()
        .filter(|name| name.ends_with("/mixed0"))
        .map(|name| {
            let (variant, seed, _) = parse_name(name);
            (variant, seed)
        })
        .collect();
    let mut tally = Tally::new();
    for (variant, seed) in starts {
        let mut rng = TorchRng::new(seed, variant);
        for i in 0.. {
            let name = format!("{variant}/seed{seed}/mixed{i}");
            let Some((shape, want)) = fixture.get(&name) else {
                break;
            };
            let got = rng
                .sample(shape, &Device::Cpu)
                .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            tally.compare(&name, &got, want);
        }
    }
    tally.finish("mixed call sequences");
}
