"""MonoTAKD: the toy KITTI world, the BEV lift, the losses (IMD, CMRD, response KD, detection)
and the released-code defects behind `as_released`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses
from kd_jax.data import toy_kitti as tk
from kd_jax.losses.monotakd import center_targets, minmax, residual_target
from kd_jax.models import monotakd as M
from tests.helpers import call_objective
from tests.tolerances import f32_tol

SIZE = (32, 96)


@pytest.fixture(scope="module")
def frames():
    return tk.generate(6, 3, size=SIZE)


def test_world_is_seeded_and_has_format_a_fields(frames):
    again = tk.generate(6, 3, size=SIZE)
    for k, v in frames.items():
        np.testing.assert_array_equal(v, again[k])
    assert frames["image"].shape == (6, *SIZE, 3) and frames["image"].dtype == np.float32
    assert frames["depth"].shape == (6, *SIZE)
    assert frames["points"].shape[-1] == 4 and frames["points_mask"].dtype == bool
    assert frames["gt_boxes_lidar"].shape[-1] == 7 and frames["gt_classes"].dtype == np.int32
    cars = frames["gt_classes"] >= 0
    assert cars.any()
    # Bottom centres sit on the ground: 1.65 m below the camera.
    np.testing.assert_allclose(frames["gt_location_cam"][cars][:, 1], 1.65, atol=1e-4)
    np.testing.assert_allclose(
        frames["gt_dimensions_lhw"][cars], [[3.9, 1.56, 1.6]] * cars.sum(), atol=1e-5
    )
    assert set(np.unique(frames["gt_occluded"][cars])) <= {0, 1, 2}
    assert ((frames["gt_truncated"] >= 0) & (frames["gt_truncated"] <= 1)).all()


def test_lidar_points_agree_with_the_depth_map(frames):
    """A LiDAR return projected into the image lands where the camera saw the same depth."""
    p2, r0, tr = tk.calib(SIZE)
    hits = 0
    for f in range(len(frames["frame_id"])):
        pts = frames["points"][f][frames["points_mask"][f], :3].astype(np.float64)
        cam = tk.lidar_to_camera_points(pts, tr, r0)
        uvw = cam @ p2[:, :3].T
        u, v = uvw[:, 0] / uvw[:, 2], uvw[:, 1] / uvw[:, 2]
        ok = (u >= 0) & (u < SIZE[1]) & (v >= 0) & (v < SIZE[0]) & (cam[:, 2] < 30)
        d = frames["depth"][f][v[ok].astype(int), u[ok].astype(int)]
        # A coarse pixel spans object edges; away from them the depths agree.
        close = np.abs(d - cam[ok, 2]) < 0.05 * cam[ok, 2] + 0.1
        assert close.mean() > 0.8
        hits += ok.sum()
    assert hits > 100


def test_boxes_round_trip_to_camera_and_2d_boxes_contain_projection(frames):
    cars = frames["gt_classes"][0] >= 0
    _, r0, tr = tk.calib(SIZE)
    loc, dims, ry = tk.boxes_lidar_to_camera(frames["gt_boxes_lidar"][0][cars], tr, r0)
    np.testing.assert_allclose(loc, frames["gt_location_cam"][0][cars], atol=1e-4)
    # OpenPCDet: rotation_y = -heading - pi/2 (wrapped).
    want = -frames["gt_boxes_lidar"][0][cars][:, 6] - np.pi / 2
    np.testing.assert_allclose(np.cos(ry), np.cos(want), atol=1e-5)


def test_lid_bins_follow_caddn():
    d_min, d_max, n = 2.0, 46.8, 120
    np.testing.assert_allclose(M.lid_index(jnp.float32(d_min), d_min, d_max, n), 0.0, atol=1e-6)
    np.testing.assert_allclose(M.lid_index(jnp.float32(d_max), d_min, d_max, n), n, rtol=1e-5)
    # Bin i starts at d_min + delta i (i + 1) / 2.
    delta = 2 * (d_max - d_min) / (n * (1 + n))
    i = 37
    edge = d_min + delta * i * (i + 1) / 2
    np.testing.assert_allclose(M.lid_index(jnp.float32(edge), d_min, d_max, n), i, atol=1e-3)


def test_frustum_to_voxel_places_a_feature_at_its_depth():
    """One feature pixel with all probability in one depth bin lights up exactly the voxels that
    project to that pixel and fall in that bin."""
    p2, r0, tr = (jnp.asarray(a) for a in tk.calib((32, 96)))
    grid = M.Grid(M.TOY_RANGE, (0.8, 0.8, 1.0))
    centres = jnp.asarray(grid.centres())
    hf, wf, nb = 8, 24, 24
    feat = jnp.zeros((hf, wf, 1)).at[5, 12, 0].set(1.0)
    prob = jnp.zeros((hf, wf, nb + 1)).at[5, 12, 10].set(1.0)
    # Jitted: op by op the lift compiled ~70 small programs on XLA:CPU.
    lift = jax.jit(M.frustum_to_voxel, static_argnames=("stride", "d_min", "d_max", "num_bins"))
    vox = lift(feat, prob, p2, r0, tr, centres, stride=4, d_min=2.0, d_max=46.8, num_bins=nb)
    lit = np.argwhere(np.asarray(vox[..., 0]) > 0)
    assert len(lit) > 0
    pts = np.asarray(centres)[tuple(lit.T)]
    cam = tk.lidar_to_camera_points(pts, np.asarray(tr), np.asarray(r0))
    b = np.asarray(M.lid_index(jnp.asarray(cam[:, 2]), 2.0, 46.8, nb))
    assert ((b >= 9) & (b < 11)).all()  # linear between bins 10 and its neighbour
    uvw = cam @ np.asarray(p2)[:, :3].T
    assert (np.floor(uvw[:, 0] / uvw[:, 2] / 4) == 12).all()
    assert (np.floor(uvw[:, 1] / uvw[:, 2] / 4) == 5).all()


def test_gt_depth_bins_average_nonzero_pixels():
    depth = jnp.zeros((1, 4, 4)).at[0, 0, 0].set(10.0).at[0, 1, 1].set(12.0)
    bins = M.depth_bins(depth, d_min=2.0, d_max=46.8, num_bins=24, stride=2)
    want = int(np.floor(M.lid_index(jnp.float32(11.0), 2.0, 46.8, 24)))
    assert bins[0, 0, 0] == want and (np.asarray(bins)[0].ravel()[1:] == 24).all()


# Jitted: op by op the target builder compiled ~60 small programs on XLA:CPU.
_center_targets = jax.jit(center_targets, static_argnames="grid_shape")


def test_center_targets_decode_back_to_the_boxes(frames):
    boxes, classes = frames["gt_boxes_lidar"][:2], frames["gt_classes"][:2]
    heat, reg, cmask = _center_targets(boxes, classes, grid_shape=(48, 48))
    n_in = int((classes == 0).sum())
    assert int(cmask.sum()) == n_in and float(heat.max()) == 1.0
    logits = jnp.where(heat[..., None] >= 1.0, 10.0, -10.0)
    out, scores = jax.jit(M.decode, static_argnames="k")(logits, reg, k=8)
    for b in range(2):
        got = np.asarray(out[b][np.asarray(scores[b]) > 0.5])
        want = boxes[b][classes[b] == 0]
        assert len(got) == len(want)
        for w in want:
            j = np.argmin(np.linalg.norm(got[:, :2] - w[:2], axis=1))
            np.testing.assert_allclose(got[j, :6], w[:6], atol=1e-4)
            np.testing.assert_allclose(np.cos(got[j, 6] - w[6]), 1.0, atol=1e-5)


def test_centerpoint_det_is_small_for_a_perfect_prediction(frames):
    boxes, classes = jnp.asarray(frames["gt_boxes_lidar"]), jnp.asarray(frames["gt_classes"])
    heat, reg, _ = _center_targets(boxes, classes, grid_shape=(48, 48))
    good = jnp.where(heat[..., None] >= 1.0, 12.0, -12.0)
    det = jax.jit(lambda s: losses.centerpoint_det(student=s, teacher=(boxes, classes)))
    perfect = det((good, reg))
    bad = det((-good, reg + 1.0))
    assert float(perfect) < 1e-3 < float(bad)


def _bev(seed, shape=(2, 4, 5, 3)):
    # numpy draws: an eager jax.random.normal compiles threefry once per shape on XLA:CPU.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_imd_matches_hand_formula_and_the_released_one_has_no_gradient():
    s, t = _bev(0), _bev(1)

    # Jitted (op by op these formulas compiled ~60 small programs on XLA:CPU).
    @jax.jit
    def hand(s, t):
        ns = (s - s.min((1, 2, 3), keepdims=True)) / (
            s.max((1, 2, 3), keepdims=True) - s.min((1, 2, 3), keepdims=True) + 1e-6
        )
        nt = (t - t.min((1, 2, 3), keepdims=True)) / (
            t.max((1, 2, 3), keepdims=True) - t.min((1, 2, 3), keepdims=True) + 1e-6
        )
        # Released: one min-max over the whole batch tensor.
        nb = (s - s.min()) / (s.max() - s.min() + 1e-6)
        tb = (t - t.min()) / (t.max() - t.min() + 1e-6)
        return jnp.mean((ns - nt) ** 2), jnp.mean((nb - tb) ** 2)

    imd = jax.jit(losses.monotakd_imd, static_argnames="as_released")
    grad = jax.jit(
        jax.grad(lambda x, r: losses.monotakd_imd(student=x, teacher=t, as_released=r)),
        static_argnums=1,
    )
    want, want_released = hand(s, t)
    got = imd(student=s, teacher=t)
    np.testing.assert_allclose(got, float(want), rtol=f32_tol())
    g_fixed = grad(s, False)
    g_rel = grad(s, True)
    assert float(jnp.abs(g_fixed).sum()) > 0
    assert float(jnp.abs(g_rel).sum()) == 0.0
    np.testing.assert_allclose(
        imd(student=s, teacher=t, as_released=True), want_released, rtol=f32_tol()
    )


def test_cmrd_residual_keeps_values_above_sixty_percent_of_the_max():
    ta = jnp.asarray([0.0, 1.0, 0.5, 0.9, 0.2]).reshape(1, 1, 5, 1)
    lidar = jnp.asarray([0.0, 0.0, 0.0, 0.0, 1.0]).reshape(1, 1, 5, 1)
    res = residual_target(ta, lidar)
    # |norm(ta) - norm(lidar)| = [0, 1, .5, .9, .8]; max 1 -> keep >= 0.6.
    np.testing.assert_allclose(np.ravel(res), [0, 1, 0, 0.9, 0.8], atol=1e-5)
    s = jnp.zeros_like(ta)
    got = losses.monotakd_cmrd(student=(s, ta), teacher=lidar)
    np.testing.assert_allclose(got, (1 + 0.81 + 0.64) / 5, rtol=1e-5)
    # The TA enters under stop_gradient; only the residual branch learns.
    g = jax.grad(lambda a: losses.monotakd_cmrd(student=(s, a), teacher=lidar))(ta)
    assert float(jnp.abs(g).sum()) == 0.0
    # Released: F_T is not normalised, so its raw scale sets the max (2.8 -> keep >= 1.68).
    rel = residual_target(ta, 3.0 * lidar, as_released=True)
    np.testing.assert_allclose(np.ravel(rel), [0, 0, 0, 0, 2.8], atol=1e-5)


def test_minmax_per_frame_is_differentiable_and_batch_independent():
    x = _bev(2)
    one = minmax(x[:1])
    np.testing.assert_allclose(minmax(x)[:1], one, atol=1e-6)


def test_response_kd_is_zero_when_the_student_copies_the_teacher():
    hm, reg = _bev(3, (2, 6, 6, 1)) * 3, _bev(4, (2, 6, 6, 8))
    zero = losses.monotakd_response(student=(hm, reg), teacher=(hm, reg))
    np.testing.assert_allclose(zero, 0.0, atol=1e-6)
    other = losses.monotakd_response(student=(hm * 0, reg * 0), teacher=(hm, reg))
    assert float(other) > 0.01


@pytest.fixture(scope="module")
def camera(frames):
    kw = dict(widths=(4, 8), image_features=4, width=8, num_bins=8, bev_voxel=1.6, z_voxel=2.0)
    b = {k: jnp.asarray(v) for k, v in frames.items()}
    args = (
        b["image"][:2],
        b["depth"][:2],
        b["calib_P2"][:2],
        b["calib_R0"][:2],
        b["calib_Tr_velo_to_cam"][:2],
    )
    return kw, args


# The camera model under jit, the module static (equal modules share a program): op by op its
# init and forward compiled ~200 small programs on XLA:CPU.
_init = jax.jit(lambda m, key, args: m.init(key, *args), static_argnums=0)
_forward = jax.jit(lambda m, v, args: m.apply(v, *args), static_argnums=0)


def _apply(kw, args, **over):
    m = M.MonoTAKDCamera(**{**kw, **over})
    v = _init(m, jax.random.key(0), args)
    return m, v


def test_ffm_switch_changes_what_the_head_reads(camera):
    kw, args = camera
    m_on, v = _apply(kw, args, ffm=True)
    m_off = M.MonoTAKDCamera(**{**kw, "ffm": False})

    # The head's output and the gradient of its sum, one jitted program per model (an eager
    # grad of the camera model compiles every op on its own: ~20 s on CPU).
    def head_sum(p, model):
        out = model.apply({**v, "params": p}, *args)[0]
        return out.sum(), out

    grad = jax.jit(jax.grad(head_sum, has_aux=True), static_argnums=1)
    g_off, off = grad(v["params"], m_off)  # the same parameter tree
    g_on, on = grad(v["params"], m_on)
    assert not np.allclose(on, off)
    # With FFM off the head does not depend on the residual branch (released: dead FFM).
    assert float(jnp.abs(g_off["sam_res"]["dconv"]["kernel"]).sum()) == 0.0
    assert float(jnp.abs(g_on["sam_res"]["dconv"]["kernel"]).sum()) > 0.0


def test_ta_mode_reads_gt_depth_and_student_mode_does_not(camera):
    kw, args = camera
    m_ta, v = _apply(kw, args, mode="ta")
    m_st = M.MonoTAKDCamera(**{**kw, "mode": "student"})
    depth2 = args[1] * 0.5
    ta_a, _ = _forward(m_ta, v, args)
    ta_b, _ = _forward(m_ta, v, (args[0], depth2, *args[2:]))
    st_a, _ = _forward(m_st, v, args)
    st_b, _ = _forward(m_st, v, (args[0], depth2, *args[2:]))
    assert not np.allclose(ta_a, ta_b)
    np.testing.assert_array_equal(st_a, st_b)


def test_scnet_as_released_applies_one_block_fewer(camera):
    kw, args = camera
    m, v = _apply(kw, args, refine_blocks=2)
    rel = M.MonoTAKDCamera(**{**kw, "refine_blocks": 2, "scnet_as_released": True})
    v_rel = jax.eval_shape(rel.init, jax.random.key(0), *args)  # its structure only
    assert jax.tree.structure(v["params"]) == jax.tree.structure(v_rel["params"])
    g = jax.jit(jax.grad(lambda p: rel.apply({**v, "params": p}, *args)[0].sum()))(v["params"])
    assert float(jnp.abs(g["refine_0"]["ConvBN_0"]["Conv_0"]["kernel"]).sum()) == 0.0
    assert float(jnp.abs(g["refine_1"]["ConvBN_0"]["Conv_0"]["kernel"]).sum()) > 0.0


def test_ground_truth_boxes_as_detections_score_full_ap():
    """The evaluator's box conventions: GT LiDAR boxes decoded into KITTI annotations and scored
    against the toy labels give AP 100 at IoU 0.7 (moderate) in 2D, BEV and 3D."""
    from kd_jax.evaluators.kitti_ap import annos_from_example, kitti_eval
    from kd_jax.evaluators.monotakd import detections_to_anno

    f = tk.generate(40, 11, size=SIZE)
    gts, dts = [], []
    for i in range(40):
        gts.append(annos_from_example(f, i))
        cars = f["gt_classes"][i] == 0
        dts.append(
            detections_to_anno(
                f["gt_boxes_lidar"][i][cars],
                np.ones(cars.sum()),
                p2=f["calib_P2"][i],
                r0=f["calib_R0"][i],
                tr=f["calib_Tr_velo_to_cam"][i],
                image_size=SIZE,
            )
        )
    h = SIZE[0] / 375
    res = kitti_eval(gts, dts, min_height=(40 * h, 25 * h, 25 * h))
    for kind in ("bbox", "bev", "3d"):
        assert res[f"Car/{kind}_R40/moderate"] > 99.0, (kind, res[f"Car/{kind}_R40/moderate"])
    # The evaluator's scorer adds OpenPCDet's loose set (BEV / 3D at 0.5) per seed.
    from kd_jax.evaluators.monotakd import score

    both = score(gts, [dts, dts], min_height=(40 * h, 25 * h, 25 * h), loose=True)
    assert both["eval/Car@0.5/3d_R40/moderate"].shape == (2,)
    assert (both["eval/Car@0.5/3d_R40/moderate"] > 99.0).all()
    # Shifting every box by 1.5 m along x breaks the 0.7 IoU in BEV and 3D.
    for d in dts:
        d["location"] = d["location"] + np.array([0.0, 0.0, 1.5])
    res = kitti_eval(gts, dts, min_height=(40 * h, 25 * h, 25 * h))
    assert res["Car/bev_R40/moderate"] < 1.0 and res["Car/3d_R40/moderate"] < 1.0


def _contract_inputs(name, frames):
    """(args, identical-input args or None) of each MonoTAKD objective for 3 frames."""
    bev = lambda k: _bev(k, (3, 4, 5, 6))  # noqa: E731
    if name == "monotakd_imd":
        return {"student": bev(0), "teacher": bev(1)}, {"student": bev(1), "teacher": bev(1)}
    if name == "monotakd_cmrd":
        ta, lidar = bev(1), bev(2)
        res = residual_target(ta, lidar)
        return (
            {"student": (bev(0), ta), "teacher": lidar},
            {"student": (res, ta), "teacher": lidar},
        )
    if name == "monotakd_response":
        t = (_bev(3, (3, 6, 6, 1)), _bev(4, (3, 6, 6, 8)))
        s = (_bev(5, (3, 6, 6, 1)), _bev(6, (3, 6, 6, 8)))
        return {"student": s, "teacher": t}, {"student": t, "teacher": t}
    if name == "centerpoint_det":
        s = (_bev(7, (3, 48, 48, 1)), _bev(8, (3, 48, 48, 8)))
        t = (jnp.asarray(frames["gt_boxes_lidar"][:3]), jnp.asarray(frames["gt_classes"][:3]))
        return {"student": s, "teacher": t}, None
    s = _bev(9, (3, 4, 5, 7))
    return {"student": s, "teacher": jnp.asarray(np.arange(60).reshape(3, 4, 5) % 7)}, None


@pytest.mark.parametrize(
    "name", ["monotakd_imd", "monotakd_cmrd", "monotakd_response", "centerpoint_det", "depth_ce"]
)
def test_objective_contract(name, frames):
    """Per-frame values: 'none' is [B], 'sum' its sum, 'mean' its mean; a [B] mask drops frames;
    zero on identical inputs where the loss is a distance; finite gradients."""
    fn = losses.get(name)
    args, same = _contract_inputs(name, frames)
    # Under jit (tests.helpers.call_objective: the three reductions from one program); op by
    # op, each loss compiled tens of small programs on XLA:CPU.
    per = call_objective(name, args, {}, reduction="none")
    assert per.shape == (3,) and per.dtype == jnp.float32 and (np.asarray(per) >= 0).all()
    sum_ = call_objective(name, args, {}, reduction="sum")
    np.testing.assert_allclose(sum_, per.sum(), rtol=f32_tol(3))
    np.testing.assert_allclose(call_objective(name, args, {}), per.mean(), rtol=f32_tol(3))
    mask = jnp.asarray([1.0, 0.0, 1.0])
    masked = call_objective(name, args, {}, mask=mask)
    np.testing.assert_allclose(masked, (per[0] + per[2]) / 2, rtol=f32_tol(3))
    if same is not None:
        np.testing.assert_allclose(call_objective(name, same, {}), 0.0, atol=1e-6)
    grads = jax.jit(jax.grad(lambda s: fn(**{**args, "student": s})))(args["student"])
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
