"""trainer_state.json: typed, versioned, checked on read; a schema this version did not write is refused."""
import json

import pytest

from dcgan_dist.run.state import SCHEMA, TrainerState


def test_a_state_round_trips_with_its_schema_and_a_kimg_for_readers():
    state = TrainerState(step=30, images_seen=3840, global_batch=128, world_size=2, mixed_precision="bf16",
                         wandb_run_id="1a2b3c4d", skipped_d=1, data_errors=2, excluded_shards=["000003.tar"],
                         last_eval={"fid": 200.5}, best={"metric": "fid", "value": 200.5, "step": 30})
    text = state.to_json()
    assert json.loads(text)["schema"] == SCHEMA and json.loads(text)["kimg"] == 3.84
    assert TrainerState.from_json(text) == state


@pytest.mark.parametrize("raw, says", [
    ({"step": -1, "schema": SCHEMA}, "'step' is not a count"),
    ({"step": True, "schema": SCHEMA}, "'step' is not a count"),
    ({"step": 3, "wandb_run_id": "../x", "schema": SCHEMA}, "W&B run id"),
    ({"step": 3, "excluded_shards": "a.tar", "schema": SCHEMA}, "excluded_shards"),
    ({"step": 3, "best": {"metric": "fid"}, "schema": SCHEMA}, "'best' lacks"),
    ({"step": 3, "global_batch": 0, "schema": SCHEMA}, "'global_batch' is not a positive count"),
    ({"step": 3, "schema": 99}, "schema 99"),
    ({"step": 7, "kimg": 0.9}, "schema None, which this version does not read"),
    ([1, 2], "not a JSON object")])
def test_a_damaged_state_is_refused_saying_what_is_wrong(raw, says):
    with pytest.raises(ValueError, match=says):
        TrainerState.from_json(json.dumps(raw))
