//! The checkpoint comparisons can fail: a deliberate mistake in one step (LayerNorm variance,
//! a transposed Conv1D weight, no causal mask, erf GELU) fed the reference input of that step
//! breaks its checkpoint, while the correct op on the same input passes. Each test runs both.

mod common;

use common::{Reference, is_close, root};
use llorch_engine::Gpt2Config;
use llorch_engine::layers::gemm::Layout;
use llorch_engine::layers::{self, naive};
use llorch_engine::matrix::Matrix;
use llorch_engine::weights::{Weights, expected_shapes};
use ndarray::{Array2, ArrayD, Ix2, s};

fn tiny_config() -> llorch_engine::ModelConfig {
    Gpt2Config::from_dir(&root().join("fixtures/models/tiny")).unwrap().validate().unwrap()
}

fn tiny() -> (Weights, llorch_engine::ModelConfig) {
    let dir = root().join("fixtures/models/tiny");
    (Weights::load(&dir.join("model.safetensors")).unwrap(), tiny_config())
}

fn two_d(a: ArrayD<f32>) -> Array2<f32> {
    a.into_dimensionality::<Ix2>().unwrap()
}

fn param(w: &mut Weights, name: &str) -> llorch_engine::weights::Param {
    let shapes = expected_shapes(&tiny_config());
    w.take(name, &shapes.iter().find(|(n, _)| n == name).unwrap().1).unwrap()
}

#[test]
fn unbiased_layernorm_variance_fails_checkpoint_1() {
    let (mut w, cfg) = tiny();
    let r = Reference::load("tiny", "long");
    let ids = &r.meta.prompt_ids;
    let (wte, wpe) = (param(&mut w, "wte.weight"), param(&mut w, "wpe.weight"));
    let (g, b) = (param(&mut w, "h.0.ln_1.weight"), param(&mut w, "h.0.ln_1.bias"));
    let mut x = Array2::zeros((ids.len(), cfg.n_embd));
    let positions: Vec<usize> = (0..ids.len()).collect();
    let wte = Matrix::from_f32(wte.as_slice().to_vec(), Layout::NK, cfg.n_embd, cfg.vocab_size);
    layers::encoder(x.view_mut(), &wte, wpe.view2(), ids, &positions);

    let mut right = Array2::zeros(x.dim());
    layers::layernorm(right.view_mut(), x.view(), g.view1(), b.view1(), cfg.eps);
    assert!(is_close(&right.into_dyn(), &r.tensor("ln1"), 1e-5));

    let c = cfg.n_embd as f32;
    let wrong = Array2::from_shape_fn(x.dim(), |(t, i)| {
        let row = x.row(t);
        let mean = row.sum() / c;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / (c - 1.0);
        (x[[t, i]] - mean) / (var + cfg.eps).sqrt() * g.view1()[i] + b.view1()[i]
    });
    assert!(
        !is_close(&wrong.into_dyn(), &r.tensor("ln1"), 1e-5),
        "N-1 variance passed checkpoint 1"
    );
}

#[test]
fn a_transposed_c_attn_weight_fails_checkpoint_2() {
    let (mut w, cfg) = tiny();
    let r = Reference::load("tiny", "long");
    let c = cfg.n_embd;
    let ln1 = two_d(r.tensor("ln1"));
    let (wt, bias) =
        (param(&mut w, "h.0.attn.c_attn.weight"), param(&mut w, "h.0.attn.c_attn.bias"));
    let q_of = |weight: ndarray::ArrayView2<'_, f32>| {
        naive::matmul(ln1.view(), weight, Some(bias.view1()))
            .slice(s![.., ..c])
            .to_owned()
            .into_dyn()
    };
    assert!(is_close(&q_of(wt.view2()), &r.tensor("q"), 1e-4));
    // The old spec's mistake: reading the [in, out] Conv1D weight as [out, in].
    let as_out_in = ndarray::ArrayView2::from_shape((3 * c, c), wt.as_slice()).unwrap();
    assert!(
        !is_close(&q_of(as_out_in.t()), &r.tensor("q"), 1e-4),
        "transposed weight passed checkpoint 2"
    );
}

#[test]
fn attention_without_the_causal_mask_fails_checkpoints_4_and_5() {
    let (mut w, cfg) = tiny();
    let r = Reference::load("tiny", "long");
    let (q, k, v) = (two_d(r.tensor("q")), two_d(r.tensor("k")), two_d(r.tensor("v")));
    let (proj_w, proj_b) =
        (param(&mut w, "h.0.attn.c_proj.weight"), param(&mut w, "h.0.attn.c_proj.bias"));
    let attn_out =
        |y: &Array2<f32>| naive::matmul(y.view(), proj_w.view2(), Some(proj_b.view1())).into_dyn();

    let (masked, scores) = naive::attention(q.view(), k.view(), v.view(), cfg.n_head);
    assert!(is_close(&attn_out(&masked), &r.tensor("attn_out"), 1e-4));
    assert!(is_close(&scores.into_dyn(), &r.tensor("att_scores"), 1e-4));

    // Unmasked: every query sees every key (one query at a time, placed last).
    let t = q.nrows();
    let mut unmasked = Array2::zeros(q.dim());
    for i in 0..t {
        let (row, _) = naive::attention(q.slice(s![i..i + 1, ..]), k.view(), v.view(), cfg.n_head);
        unmasked.row_mut(i).assign(&row.row(0));
    }
    assert!(
        !is_close(&attn_out(&unmasked), &r.tensor("attn_out"), 1e-4),
        "no mask passed checkpoint 5"
    );
    let mut unmasked_scores = ndarray::Array3::zeros((cfg.n_head, t, t));
    for i in 0..t {
        let (_, sc) = naive::attention(q.slice(s![i..i + 1, ..]), k.view(), v.view(), cfg.n_head);
        unmasked_scores.slice_mut(s![.., i, ..]).assign(&sc.slice(s![.., 0, ..]));
    }
    assert!(
        !is_close(&unmasked_scores.into_dyn(), &r.tensor("att_scores"), 1e-4),
        "no mask passed checkpoint 4"
    );
}

#[test]
fn erf_gelu_fails_checkpoint_6() {
    let (mut w, _) = tiny();
    let r = Reference::load("tiny", "long");
    let mlp_in = two_d(r.tensor("mlp_in"));
    let (fc_w, fc_b) = (param(&mut w, "h.0.mlp.c_fc.weight"), param(&mut w, "h.0.mlp.c_fc.bias"));
    let (pr_w, pr_b) =
        (param(&mut w, "h.0.mlp.c_proj.weight"), param(&mut w, "h.0.mlp.c_proj.bias"));
    let mlp = |act: fn(f32) -> f32| {
        let h = naive::matmul(mlp_in.view(), fc_w.view2(), Some(fc_b.view1())).mapv(act);
        naive::matmul(h.view(), pr_w.view2(), Some(pr_b.view1())).into_dyn()
    };
    assert!(is_close(&mlp(naive::gelu), &r.tensor("mlp_out"), 1e-4));
    assert!(!is_close(&mlp(gelu_erf), &r.tensor("mlp_out"), 1e-4), "erf GELU passed checkpoint 6");
}

/// `0.5·x·(1 + erf(x/√2))`, erf by Abramowitz–Stegun 7.1.26 (|error| < 1.5e-7).
fn gelu_erf(x: f32) -> f32 {
    let z = f64::from(x) / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = (1.0 - poly * (-z * z).exp()).copysign(z);
    (0.5 * f64::from(x) * (1.0 + erf)) as f32
}
