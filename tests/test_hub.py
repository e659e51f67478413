"""What `push_to_hub` and `hub_strategy` upload. The Hub cannot be reached here: `HfApi.create_repo` and
`HfApi.upload_folder` are replaced by a fake that copies what would be uploaded (after the ignore patterns, which
`huggingface_hub` itself applies) into a local folder standing for the repo; everything before the upload is real."""

import shutil
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification

from fed_trainer import FederatedTrainer


class FakeHub:
    """A repo in a local folder: `uploads` lists each upload's path in the repo and the files it sent."""

    def __init__(self, root: Path):
        self.root, self.uploads = root, []

    def create_repo(self, api, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(self, api, *, folder_path, path_in_repo=None, run_as_future=False, ignore_patterns=None,
                      allow_patterns=None, **kwargs):  # fmt: skip
        folder = Path(folder_path)
        files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        sent = sorted(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        for name in sent:
            target = self.root / (path_in_repo or "") / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / name, target)
        self.uploads.append((path_in_repo or "", sent))
        if not run_as_future:
            return None
        done = Future()
        done.set_result(None)
        return done


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub(tmp_path / "repo")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: fake.upload_folder(api, **kw))
    return fake


CLIENTS = [toy_dataset(12, seed) for seed in (1, 2, 3)]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])


def test_push_to_hub_uploads_the_merged_model_and_card_but_no_round_checkpoint(make_config, hub):
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0), args=make_config(strategy="fedit", learning_rate=2e-2, save_every_rounds=1),
        client_datasets=CLIENTS, peft_config=LORA, eval_dataset=toy_dataset(16, seed=9),
    )  # fmt: skip
    trainer.train()
    assert (Path(trainer.args.output_dir) / "round-2").is_dir()
    trainer.push_to_hub()
    ((path, sent),) = hub.uploads
    assert path == "" and not any(name.startswith("round-") for name in sent)
    assert {"config.json", "model.safetensors", "README.md"} <= set(sent) and "adapter_config.json" not in sent
    card = (hub.root / "README.md").read_text(encoding="utf-8")
    assert "## Federated training" in card and "strategy: `fedit`" in card and "- federated-learning" in card
    uploaded = AutoModelForSequenceClassification.from_pretrained(hub.root).eval()  # loads without peft
    inputs = torch.tensor(toy_dataset(16, seed=9)["input_ids"])
    with torch.no_grad():
        expected = trainer.merged_model().eval()(input_ids=inputs).logits
        torch.testing.assert_close(uploaded(input_ids=inputs).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hub_strategy, folder", [("checkpoint", "last-checkpoint"), ("all_checkpoints", None)])
def test_hub_strategy_pushes_every_round_checkpoint(make_config, hub, hub_strategy, folder):
    args = make_config(save_every_rounds=1, push_to_hub=True, hub_model_id="me/fed", hub_strategy=hub_strategy)
    trainer = FederatedTrainer(model=tiny_bert(), args=args, client_datasets=CLIENTS)
    trainer.train()
    trainer._finish_current_push()
    rounds = [upload for upload in hub.uploads if upload[0] != ""]
    assert [path for path, _ in rounds] == ([folder] * 2 if folder else ["round-1", "round-2"])
    assert all("federated_state.pt" in sent for _, sent in rounds)  # resumable from the Hub
    models = [sent for path, sent in hub.uploads if path == ""]
    assert len(models) == 2 and all("model.safetensors" in s and "federated_state.pt" not in s for s in models)
    state = torch.load(hub.root / (folder or "round-2") / "federated_state.pt", weights_only=False)
    assert state["round"] == 2


def test_hub_strategy_end_pushes_only_at_push_to_hub(make_config, hub):
    args = make_config(save_every_rounds=1, push_to_hub=True, hub_model_id="me/fed", hub_strategy="end")
    trainer = FederatedTrainer(model=tiny_bert(), args=args, client_datasets=CLIENTS)
    trainer.train()
    assert hub.uploads == []
    trainer.save_model()  # with push_to_hub=True, save_model pushes, as Trainer's does
    assert [path for path, _ in hub.uploads] == [""]
