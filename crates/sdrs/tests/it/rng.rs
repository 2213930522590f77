//! TorchGenerator against torch.randn outputs written by `tools/rng_reference.py`
//! (tests/fixtures/rng/randn.safetensors: `{variant}/seed{S}/n{N}`, `.../latent`, `.../mixed{i}`).

use std::collections::BTreeMap;

use crate::common;
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

/// A1111's NV source (torch's CUDA generator on the CPU): every call of every generator in
/// tools/make_philox_fixtures.py, bit for bit, seeds past 32 bits included.
#[test]
fn nv_noise_is_bit_equal_to_the_reference() {
    use sdrs::sampling::rng::Philox;
    let manifest = common::reference_json("philox.json");
    let reference = common::reference("philox.safetensors");
    let mut generators: std::collections::HashMap<String, Philox> = Default::default();
    let mut values = 0;
    for call in manifest["randn"].as_array().expect("randn") {
        let name = call["name"].as_str().unwrap();
        let sequence = name.rsplit_once("_call").unwrap().0.to_string();
        let seed = call["seed"].as_u64().expect("seed");
        let generator = generators
            .entry(sequence)
            .or_insert_with(|| Philox::new(seed));
        let want = reference[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = generator.randn(want.len());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{name}");
        values += got.len();
    }
    assert!(values >= 10_000, "{values} values");
}

/// Whole images with NV noise (initial and ancestral) match the reference; an A1111 infotext
/// without an `RNG` key (A1111's default, GPU noise) reads as NV and gives the same image.
#[test]
fn nv_images_match_and_an_infotext_without_rng_regenerates_with_nv() {
    use sdrs::pipeline::{infotext, txt2img};
    use sdrs::sampling::rng::RandnSource;
    use sdrs::sampling::Flow;
    let manifest = common::reference_json("philox.json");
    let sd = common::load_model("tiny-sd1.safetensors");
    for case in manifest["cases"].as_array().expect("cases") {
        let file = case["file"].as_str().unwrap();
        let request = sdrs::pipeline::GenerationRequest {
            randn_source: RandnSource::Nv,
            ..common::request(case)
        };
        let images = txt2img(&sd, &request.validate().unwrap(), &mut |_| Flow::Continue)
            .expect(file)
            .images;
        let want = common::reference_image(file);
        common::assert_images_close(file, &images[0].image, &want, 2);
        assert!(
            images[0].infotext.contains("RNG: NV"),
            "{}",
            images[0].infotext
        );
        if case["sampler"] == "euler_a" {
            let a1111 = format!(
                "{}\nNegative prompt: {}\nSteps: 8, Sampler: Euler a, Schedule type: Automatic, \
                 CFG scale: {}, Seed: 42, Size: 64x64, Model: tiny-sd1",
                case["prompt"].as_str().unwrap(),
                case["negative_prompt"].as_str().unwrap(),
                case["cfg_scale"]
            );
            let back = infotext::parse(&a1111).to_request();
            assert_eq!(back.randn_source, RandnSource::Nv);
            let again = txt2img(&sd, &back.validate().unwrap(), &mut |_| Flow::Continue)
                .unwrap()
                .images;
            assert_eq!(
                again[0].image, images[0].image,
                "{file} from A1111's infotext"
            );
        }
    }
}
