"""The GRPO recipe's own options on the throwaway toy family (tests/toy_family.py): dynamic
sampling of tied groups."""

from __future__ import annotations

from toy_family import logged, toy_config

from glm_training.config import config_from_dict
from glm_training.trainers.grpo import GRPOTrainer

# A reward that ties every group on its first call (no signal) and scores brightness afterwards.
FIRST_CALL_TIES = '''
CALLS = []

def reward(images, prompts):
    CALLS.append(len(prompts))
    if len(CALLS) == 1:
        return [0.5] * len(prompts)
    return images.mean(dim=(1, 2, 3)).tolist()
'''


def grpo_run(tmp_path, dynamic: bool):
    tmp_path.mkdir(parents=True)
    reward = tmp_path / f"ties_{dynamic}.py"
    reward.write_text(FIRST_CALL_TIES)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(2)))
    raw = toy_config(tmp_path, prompts, "grpo", training={"max_train_steps": 2, "batch_size": 8},
                     grpo={"num_generations": 4, "sample_steps": 3, "eval_steps": 2, "epsilon": 0.2,
                           "dynamic_sample": dynamic, "max_resample_rounds": 2},
                     reward={"rewards": {"ties": {"type": f"python:{reward}:reward"}}})
    return logged(GRPOTrainer(config_from_dict(raw)).train())


def test_dynamic_sample_resamples_zero_std_groups(tmp_path):
    plain = grpo_run(tmp_path / "plain", dynamic=False)
    assert plain[0]["zero_std_fraction"] == 1.0  # every group tied: no signal at step 1
    assert plain[0]["advantage_abs_mean"] == 0.0
    resampled = grpo_run(tmp_path / "dynamic", dynamic=True)
    assert resampled[0]["dynamic_sample/resampled_groups"] == 2.0  # both prompts sampled again
    assert resampled[0]["zero_std_fraction"] == 0.0 and resampled[0]["advantage_abs_mean"] > 0
    assert resampled[1]["dynamic_sample/resampled_groups"] == 0.0  # nothing tied at step 2
