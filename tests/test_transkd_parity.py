"""TransKD's CSF, PEA and training loss equal the official code's (tests/fixtures/
transkd_parity.npz, made by scripts/make_transkd_fixture.py from RuipingL/TransKD): one
training-mode step at B = 2 with the release's own weights — CSF outputs, BatchNorm running
statistics (PyTorch's conventions, kd_jax.models.batchnorm), PEA outputs, the loss
CE_weighted + hcl + pea, the gradient of every weight and input, and eval mode after the step."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses import hcl, pea, seg_ce
from kd_jax.models.transkd import CSF, PEA
from tests.tolerances import f32_tol

REF = dict(np.load(os.path.join(os.path.dirname(__file__), "fixtures", "transkd_parity.npz")))
W = {k[2:]: v for k, v in REF.items() if k.startswith("w/")}
IN = {k[3:]: v for k, v in REF.items() if k.startswith("in/")}
T_CH = tuple(REF[f"in/tfeat{i}"].shape[-1] for i in range(4))
MID = W["skfs.0.conv1.0.weight"].shape[0]
# Longest accumulation: the stage-1 hcl MSE over B*16*16*6 = 3072 terms (BatchNorm's 512, the 3x3
# convs' 72 are shorter); the maps are O(1), the loss gradients carry a factor ~4 of cancellation.
TOL = f32_tol(3072, 4.0)


def _conv(w):
    return w.transpose(2, 3, 1, 0)  # torch [O, I, kh, kw] -> flax [kh, kw, I, O]


def _to_flax(w):
    """Torch state dict of SKF -> ({"csf": CSF variables}, {"pea": PEA params})."""
    params, stats = {}, {}
    for i in range(4):
        t, p, s = f"skfs.{3 - i}.", {}, {}  # SKF reverses its list: skfs.0 is the deepest
        for conv in ("conv1", "conv2"):
            p[conv] = {"kernel": _conv(w[t + f"{conv}.0.weight"])}
        bns = {"conv1_bn": "conv1.1", "conv2_bn": "conv2.1"}
        if t + "fc.0.weight" in w:
            p["fc"] = {"kernel": w[t + "fc.0.weight"][:, :, 0, 0].T}
            p["fc1"] = {"kernel": w[t + "fc1.0.weight"][:, :, 0, 0].T}
            for j in range(2):
                p[f"fcs{j}"] = {
                    "kernel": w[t + f"fcs.{j}.weight"][:, :, 0, 0].T,
                    "bias": w[t + f"fcs.{j}.bias"],
                }
            bns["fc_bn"] = "fc.1"
        for ours, theirs in bns.items():
            p[ours] = {"scale": w[t + theirs + ".weight"], "bias": w[t + theirs + ".bias"]}
            s[ours] = {
                "mean": w[t + theirs + ".running_mean"],
                "var": w[t + theirs + ".running_var"],
            }
        params[f"sk{i + 1}"], stats[f"sk{i + 1}"] = p, s
    pea_params = {
        f"proj{i + 1}": {
            "kernel": w[f"embed{i + 1}_linearproject.weight"].T,
            "bias": w[f"embed{i + 1}_linearproject.bias"],
        }
        for i in range(4)
    }
    return {"params": params, "batch_stats": stats}, {"params": pea_params}


def _from_flax_grads(g_csf, g_pea):
    """kd_jax gradients -> {torch parameter name: array in torch's layout}."""
    out = {}
    for i in range(4):
        t, p = f"skfs.{3 - i}.", g_csf[f"sk{i + 1}"]
        for conv in ("conv1", "conv2"):
            out[t + f"{conv}.0.weight"] = p[conv]["kernel"].transpose(3, 2, 0, 1)
        bns = {"conv1_bn": "conv1.1", "conv2_bn": "conv2.1"}
        if "fc" in p:
            out[t + "fc.0.weight"] = p["fc"]["kernel"].T[:, :, None, None]
            out[t + "fc1.0.weight"] = p["fc1"]["kernel"].T[:, :, None, None]
            for j in range(2):
                out[t + f"fcs.{j}.weight"] = p[f"fcs{j}"]["kernel"].T[:, :, None, None]
                out[t + f"fcs.{j}.bias"] = p[f"fcs{j}"]["bias"]
            bns["fc_bn"] = "fc.1"
        for ours, theirs in bns.items():
            out[t + theirs + ".weight"] = p[ours]["scale"]
            out[t + theirs + ".bias"] = p[ours]["bias"]
    for i in range(4):
        out[f"embed{i + 1}_linearproject.weight"] = g_pea[f"proj{i + 1}"]["kernel"].T
        out[f"embed{i + 1}_linearproject.bias"] = g_pea[f"proj{i + 1}"]["bias"]
    return out


CSF_MOD = CSF(teacher_channels=T_CH, mid_channels=MID)
PEA_MOD = PEA(teacher_channels=T_CH)


@jax.jit
def _step(v_csf, v_pea, x):
    """The release's training loss: CE_weighted + 1.0 hcl(CSF) + pea(PEA), one train step."""

    def loss(p_csf, p_pea, feats, embeds, logits):
        outs, new = CSF_MOD.apply(
            {"params": p_csf, "batch_stats": v_csf["batch_stats"]},
            feats,
            train=True,
            mutable=["batch_stats"],
        )
        proj = PEA_MOD.apply({"params": p_pea}, embeds)
        tf = [x[f"tfeat{i}"] for i in range(4)]
        te = [x[f"tembed{i}"] for i in range(4)]
        ce = seg_ce(
            student=logits,
            labels=x["labels"],
            class_weights=x["class_weights"],
            ignore_index=None,
        )
        review, embed = hcl(student=outs, teacher=tf), pea(student=proj, teacher=te)
        return ce + 1.0 * review + embed, (outs, proj, new, ce, review, embed)

    feats = [x[f"feat{i}"] for i in range(4)]
    embeds = [x[f"embed{i}"] for i in range(4)]
    (total, aux), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
        v_csf["params"], v_pea["params"], feats, embeds, x["logits"]
    )
    outs, proj, new, ce, review, embed = aux
    eval_outs = CSF_MOD.apply({"params": v_csf["params"], **new}, feats, train=False)
    return total, outs, proj, new, (ce, review, embed), grads, eval_outs


@pytest.fixture(scope="module")
def run():
    v_csf, v_pea = _to_flax(W)
    x = {k: jnp.asarray(v) for k, v in IN.items()}
    with jax.default_matmul_precision("float32"):
        return v_csf, jax.device_get(_step(v_csf, v_pea, x))


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def test_csf_and_pea_forward_in_train_mode(run):
    _, (_, outs, proj, _, _, _, _) = run
    for i in range(4):
        assert _rel(outs[i], REF[f"csf_train/{i}"]) <= TOL, ("csf", i)
        assert _rel(proj[i], REF[f"pea_out/{i}"]) <= TOL, ("pea", i)


def test_batchnorm_running_statistics_after_one_step(run):
    """PyTorch's momentum 0.1 and unbiased running variance (n = 8 on the deepest stage)."""
    _, (_, _, _, new, _, _, _) = run
    for i in range(4):
        for bn, theirs in (("conv1_bn", "conv1.1"), ("conv2_bn", "conv2.1"), ("fc_bn", "fc.1")):
            if bn not in new["batch_stats"][f"sk{i + 1}"]:
                continue
            s, t = new["batch_stats"][f"sk{i + 1}"][bn], f"after/skfs.{3 - i}.{theirs}"
            assert _rel(s["mean"], REF[t + ".running_mean"]) <= TOL, (i, bn, "mean")
            assert _rel(s["var"], REF[t + ".running_var"]) <= TOL, (i, bn, "var")


def test_loss_and_every_gradient(run):
    _, (total, _, _, _, (ce, review, embed), grads, _) = run
    for name, got in (("loss", total), ("seg_ce", ce), ("hcl", review), ("pea", embed)):
        assert _rel(got, REF[name]) <= TOL, name
    g_csf, g_pea, g_feats, g_embeds, g_logits = grads
    ours = _from_flax_grads(g_csf, g_pea)
    theirs = {k[5:]: v for k, v in REF.items() if k.startswith("grad/")}
    params = {k for k in theirs if "." in k}
    assert set(ours) == params
    for k in params:
        if not np.any(theirs[k]):  # fc1: only the batch-size-1 path uses it
            assert not np.any(ours[k]), k
            continue
        assert _rel(ours[k], theirs[k]) <= TOL, (k, _rel(ours[k], theirs[k]))
    for i in range(4):
        assert _rel(g_feats[i], theirs[f"feat{i}"]) <= TOL, ("feat", i)
        assert _rel(g_embeds[i], theirs[f"embed{i}"]) <= TOL, ("embed", i)
    assert _rel(g_logits, theirs["logits"]) <= TOL


def test_eval_mode_after_the_step(run):
    _, (_, _, _, _, _, _, eval_outs) = run
    for i in range(4):
        assert _rel(eval_outs[i], REF[f"csf_eval/{i}"]) <= TOL, i


def _gl_flax(w):
    """CSF_GLMixer.py's SKF weights -> (GLMixer params, PEA params)."""
    conv = lambda k: w[k].transpose(2, 1, 0)  # noqa: E731  torch Conv1d [O, I, k] -> [k, I, O]
    gl = {
        "qkv": {"kernel": w["attn4.qkv.weight"].T},
        "proj": {"kernel": w["attn4.proj.weight"].T, "bias": w["attn4.proj.bias"]},
        "conv1": {"kernel": conv("conv1.weight"), "bias": w["conv1.bias"]},
        "conv2": {"kernel": conv("conv2.weight"), "bias": w["conv2.bias"]},
        "atten_weight": w["atten_weight"].reshape(()),
        "conv_weight": w["conv_weight"].reshape(()),
    }
    pea_p = {
        f"proj{i + 1}": {
            "kernel": w[f"embed{i + 1}_linearproject.weight"].T,
            "bias": w[f"embed{i + 1}_linearproject.bias"],
        }
        for i in range(4)
    }
    return gl, pea_p


def test_gl_mixer_and_its_pea_loss():
    """TransKD-GL: GL-Mixer on the stage-4 tokens, then PEA; value, every weight's gradient."""
    from kd_jax.models.transkd import GLMixer

    w = {k[5:]: v for k, v in REF.items() if k.startswith("gl/w/")}
    gl, pea_p = _gl_flax(w)
    embeds = [jnp.asarray(IN[f"embed{i}"]) for i in range(4)]
    te = [jnp.asarray(IN[f"tembed{i}"]) for i in range(4)]
    mixer = GLMixer(heads=2, add=False)

    def loss(gl, pea_p, e4):
        mixed = mixer.apply({"params": gl}, e4)
        proj = PEA_MOD.apply({"params": pea_p}, [*embeds[:3], mixed])
        return pea(student=proj, teacher=te), proj[3]

    with jax.default_matmul_precision("float32"):
        (value, pea4), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
            gl, pea_p, embeds[3]
        )
    assert _rel(value, REF["gl/pea"]) <= TOL
    assert _rel(pea4, REF["gl/pea4_out"]) <= TOL
    g_gl, g_pea, g_e4 = jax.device_get(grads)
    theirs = {k[8:]: v for k, v in REF.items() if k.startswith("gl/grad/")}
    ours = {
        "attn4.qkv.weight": g_gl["qkv"]["kernel"].T,
        "attn4.proj.weight": g_gl["proj"]["kernel"].T,
        "attn4.proj.bias": g_gl["proj"]["bias"],
        "conv1.weight": g_gl["conv1"]["kernel"].transpose(2, 1, 0),
        "conv1.bias": g_gl["conv1"]["bias"],
        "conv2.weight": g_gl["conv2"]["kernel"].transpose(2, 1, 0),
        "conv2.bias": g_gl["conv2"]["bias"],
        "atten_weight": g_gl["atten_weight"].reshape(1),
        "conv_weight": g_gl["conv_weight"].reshape(1),
        "embed3": g_e4,
    }
    for i in range(4):
        ours[f"embed{i + 1}_linearproject.weight"] = g_pea[f"proj{i + 1}"]["kernel"].T
        ours[f"embed{i + 1}_linearproject.bias"] = g_pea[f"proj{i + 1}"]["bias"]
    assert set(ours) == set(theirs)
    for k in ours:
        assert _rel(ours[k], theirs[k]) <= TOL, (k, _rel(ours[k], theirs[k]))
