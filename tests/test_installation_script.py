import subprocess
import sys

from conftest import REPO


def test_installation_check_passes_here():
    result = subprocess.run([sys.executable, str(REPO / "test_installation.py")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configs/quickstart.yaml" in result.stdout and "All required checks passed." in result.stdout


def test_quickstart_config_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
         "--set", f"logging.output_dir={tmp_path}", "--set", "training.max_train_steps=4",
         "--set", "training.checkpointing_steps=2", "--set", "logging.sample_steps=0",
         "--set", "logging.sample_num_inference_steps=2", "--set", f"data.path={REPO / 'data' / 'quickstart'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "quickstart" / "v0"
    for path in ("final/pytorch_lora_weights.safetensors", "final/comfyui/pytorch_lora_weights.safetensors",
                 "samples/step-000004.png", "config.yaml", "checkpoint-4/trainer_state.json"):
        assert (run / path).exists(), path
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
