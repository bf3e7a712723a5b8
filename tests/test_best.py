"""checkpoints/best is replaced without ever leaving the run with no complete best on disk."""
from dcgan_dist.run.checkpoint import MARKER, _replace_dir, recover_best


def complete(path, step):
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(f'{{"step": {step}}}')
    (path / MARKER).write_text(f"step {step}\n")
    return path


def test_replacing_best_swaps_in_the_new_state(tmp_path):
    best = complete(tmp_path / "checkpoints/best", 6)
    _replace_dir(complete(tmp_path / "checkpoints/.tmp-best", 12), best)
    assert recover_best(tmp_path) == best and '"step": 12' in (best / "trainer_state.json").read_text()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best"]


def test_a_kill_between_the_two_renames_keeps_the_old_best(tmp_path):
    # The state a kill leaves after `best` was moved aside and before the new one was moved in.
    complete(tmp_path / "checkpoints/.old-best", 6)
    assert not (tmp_path / "checkpoints/best").exists()
    best = recover_best(tmp_path)
    assert best is not None and '"step": 6' in (best / "trainer_state.json").read_text()


def test_no_best_yet(tmp_path):
    assert recover_best(tmp_path) is None
