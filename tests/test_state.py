"""trainer_state.json: typed, versioned, checked on read, and older files migrated explicitly."""
import json

import pytest

from dcgan_dist.train.state import SCHEMA, TrainerState, migrate


def test_a_state_round_trips_with_its_schema_and_a_kimg_for_readers():
    state = TrainerState(step=30, images_seen=3840, global_batch=128, world_size=2, mixed_precision="bf16",
                         wandb_run_id="1a2b3c4d", skipped_d=1, data_errors=2, excluded_shards=["000003.tar"],
                         last_eval={"fid": 200.5}, best={"metric": "fid", "value": 200.5, "step": 30})
    text = state.to_json()
    assert json.loads(text)["schema"] == SCHEMA and json.loads(text)["kimg"] == 3.84
    assert TrainerState.from_json(text) == state


def test_schema_1_files_are_migrated_from_what_they_hold():
    # The first form: only kimg (rounded), no images_seen, no global_batch.
    first = migrate({"step": 100, "kimg": 12.8, "wandb_run_id": "abc"})
    assert first["images_seen"] == 12800 and first["global_batch"] == 128 and first["schema"] == 2
    # Later schema-1 files had both.
    later = migrate({"step": 100, "kimg": 6.4, "images_seen": 6400, "global_batch": 64})
    assert later["images_seen"] == 6400 and later["global_batch"] == 64
    # Nothing to count from: the resuming run counts at its own batch.
    bare = TrainerState.from_json(json.dumps({"step": 7}))
    assert bare.images_seen is None and bare.global_batch is None and bare.kimg is None


@pytest.mark.parametrize("raw, says", [
    ({"step": -1}, "'step' is not a count"),
    ({"step": True}, "'step' is not a count"),
    ({"step": 3, "wandb_run_id": "../x"}, "W&B run id"),
    ({"step": 3, "excluded_shards": "a.tar"}, "excluded_shards"),
    ({"step": 3, "best": {"metric": "fid"}}, "'best' lacks"),
    ({"step": 3, "global_batch": 0}, "'global_batch' is not a positive count"),
    ({"step": 3, "schema": 99}, "schema 99"),
    ([1, 2], "not a JSON object")])
def test_a_damaged_state_is_refused_saying_what_is_wrong(raw, says):
    with pytest.raises(ValueError, match=says):
        TrainerState.from_json(json.dumps(raw))
