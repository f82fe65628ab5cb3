"""DODEScheduler as a diffusers ConfigMixin: its config, save/load (folders, subfolders, hub ids, pipelines), the
previous format, what base classes make of its folder, attribute writes, push_to_hub (no network)."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, \
    DPMSolverMultistepScheduler, UNet2DModel

import dode
from dode.pipelines import pipeline_model, use_dode
from dode.scheduler import CONFIG_FILE, LAMBDAS_FILE, OWN_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = [30.0, 5.0, 1.0, 0.1]  # dpm_solver_pp_2m at 4 steps on an explicit grid


@pytest.fixture(scope="module")
def fitted(gmm):
    """A greedy fit (no validation: quick) and a fit with a learned grid."""
    plain = dode.distill(gmm, "dpm_solver_pp_2m", 4, batch_size=8, guard=False, progress=False)
    learned = dode.distill(gmm, "dpm_solver_pp_2m", 4, batch_size=8, refine="joint+timesteps", refine_iterations=2,
                           guard=False, progress=False)
    assert plain.grid is None and learned.grid is not None and learned.fit_info["refine"]["mode"] == "joint+timesteps"
    return {"plain": plain, "grid": learned}


def samples(model, scheduler, nfe=4):
    return dode.sample(model, scheduler, nfe, num_samples=6, seed=7, progress=False)


def saved_config(folder):
    return json.loads((folder / CONFIG_FILE).read_text())


@pytest.mark.parametrize("kind", ["plain", "grid"])
def test_save_and_load_round_trip_in_one_config_file(gmm, fitted, kind, tmp_path):
    scheduler = fitted[kind]
    scheduler.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE]
    config = saved_config(tmp_path)
    assert config["_class_name"] == "DODEScheduler" and config["base_scheduler"] == "DPMSolverMultistepScheduler"
    assert config["lambdas"] == scheduler.lambdas and config["nfe"] == 4 and config["num_inference_steps"] == 4
    assert config["grid"] == scheduler.grid and config["spacing"] == "lu"
    assert config["fit_info"] == json.loads(json.dumps(scheduler.fit_info))
    base = scheduler.base_scheduler.config
    assert {k: config[k] for k in base if not k.startswith("_")} == {k: v for k, v in base.items()
                                                                      if not k.startswith("_")}
    loaded = dode.DODEScheduler.from_pretrained(tmp_path)
    assert type(loaded.base_scheduler) is DPMSolverMultistepScheduler and loaded.grid == scheduler.grid
    assert loaded.lambdas == scheduler.lambdas and loaded.fit_info == config["fit_info"]
    assert loaded.config == scheduler.config
    assert torch.equal(samples(gmm, loaded), samples(gmm, scheduler))
    # load_config + from_config is from_pretrained, as in diffusers
    again = dode.DODEScheduler.from_config(dode.DODEScheduler.load_config(tmp_path))
    assert again.config == scheduler.config and torch.equal(samples(gmm, again), samples(gmm, scheduler))


def test_from_config_of_the_config_is_the_same_scheduler(gmm, fitted):
    for scheduler in fitted.values():
        copy_ = dode.DODEScheduler.from_config(scheduler.config)
        assert copy_.config == scheduler.config and copy_.base_scheduler is not scheduler.base_scheduler
        assert torch.equal(samples(gmm, copy_), samples(gmm, scheduler))
    scheduler = fitted["plain"]
    config = scheduler.config
    assert set(OWN_KEYS) <= set(config) and config.prediction_type == "epsilon"  # the base's keys too
    zero, unused = dode.DODEScheduler.from_config(config, lambdas=[0.0] * 4, no_such_option=1,
                                                  return_unused_kwargs=True)
    assert zero.lambdas == [0.0] * 4 and unused == {"no_such_option": 1}
    assert torch.equal(samples(gmm, zero), samples(gmm, "dpm_solver_pp_2m"))
    # the name of a scheduler class and its config build the base, as from_config does
    rebuilt = dode.DODEScheduler("DPMSolverMultistepScheduler", scheduler.lambdas, 4,
                                 base_config=scheduler.base_scheduler.config)
    assert torch.equal(samples(gmm, rebuilt), samples(gmm, scheduler))
    with pytest.raises(ValueError, match="not a DODEScheduler's.*wrap a scheduler"):
        dode.DODEScheduler.from_config(DDIMScheduler().config)
    # another scheduler class from a DODEScheduler's config: that scheduler on the same schedule (diffusers' idiom)
    ddim = DDIMScheduler.from_config(config)
    assert ddim.config.beta_end == config["beta_end"] and ddim.config.prediction_type == "epsilon"
    assert scheduler.order == 1 and DPMSolverMultistepScheduler in scheduler.compatibles


def test_subfolder_and_pipeline_layouts(gmm, fitted, tmp_path):
    scheduler = fitted["grid"]
    scheduler.save_pretrained(tmp_path / "scheduler")
    loaded = dode.DODEScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert loaded.grid == scheduler.grid and torch.equal(samples(gmm, loaded), samples(gmm, scheduler))
    assert dode.DODEScheduler.load_config(tmp_path, subfolder="scheduler") == saved_config(tmp_path / "scheduler")
    with pytest.raises(FileNotFoundError, match="not a saved DODEScheduler"):
        dode.DODEScheduler.from_pretrained(tmp_path, subfolder="unet")


def test_a_hub_id_loads_from_the_local_cache_and_fails_fast_offline(gmm, fitted, tmp_path, monkeypatch):
    monkeypatch.setattr(dode.hub, "_hub_reachable", lambda timeout=3.0: False)
    began = time.perf_counter()
    for call in (dode.DODEScheduler.from_pretrained, dode.DODEScheduler.load_config):
        with pytest.raises(dode.ModelNotFoundError, match="hub is unreachable.*DODEScheduler.from_pretrained"):
            call("someone/no-such-dode-scheduler", subfolder="scheduler", cache_dir=tmp_path / "empty-cache")
    assert time.perf_counter() - began < 5
    with pytest.raises(dode.ModelNotFoundError, match="not an existing folder"):
        dode.DODEScheduler.from_pretrained(tmp_path / "no" / "such" / "folder")
    # a hub id in the local cache (laid out as huggingface_hub keeps it) needs no network
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--d-dpm"
    fitted["plain"].save_pretrained(repo / "snapshots" / commit / "scheduler")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cached = dode.DODEScheduler.from_pretrained("someone/d-dpm", subfolder="scheduler", cache_dir=tmp_path / "cache")
    assert cached.lambdas == fitted["plain"].lambdas


def test_a_pipeline_saved_with_it_reloads_it(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    for pipeline_class in (DDPMPipeline, DDIMPipeline):
        pipe = pipeline_class(unet=unet, scheduler=DDPMScheduler(prediction_type="v_prediction", beta_end=0.015))
        pipe.set_progress_bar_config(disable=True)
        model = pipeline_model(pipe)
        if pipeline_class is DDPMPipeline:  # on an explicit grid
            scheduler = dode.make_scheduler("dpm_solver_pp_2m", model, GRID)
            scheduler.lambdas = [0.0, 0.4, -0.2, 0.6]
        else:
            scheduler = dode.DODEScheduler(dode.make_scheduler("ddim", model), [0.0, 0.5, -0.3, 0.8], 4)
        use_dode(pipe, scheduler)
        expected = pipe(**model.pipeline_inputs(3, 5), num_inference_steps=4, output_type="pt").images
        folder = tmp_path / pipeline_class.__name__
        pipe.save_pretrained(folder)
        # diffusers records a class outside its own libraries by its module
        assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["dode.scheduler",
                                                                                     "DODEScheduler"]
        reloaded = DiffusionPipeline.from_pretrained(folder)
        reloaded.set_progress_bar_config(disable=True)
        assert type(reloaded) is pipeline_class
        if pipeline_class is DDIMPipeline:  # it makes a DDIMScheduler of any scheduler: the base's schedule
            assert type(reloaded.scheduler) is DDIMScheduler
            assert reloaded.scheduler.config.beta_end == 0.015
            use_dode(reloaded, folder / "scheduler")  # as the README says
        assert isinstance(reloaded.scheduler, dode.DODEScheduler)
        assert reloaded.scheduler.config == scheduler.config
        got = reloaded(**model.pipeline_inputs(3, 5), num_inference_steps=4, output_type="pt").images
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# the previous format: the base's own scheduler_config.json plus dode_lambdas.json
def save_previous_format(scheduler, folder):
    """What ``DODEScheduler.save_pretrained`` wrote before it was a ConfigMixin."""
    scheduler.base_scheduler.save_pretrained(folder)
    record = {"base_scheduler": type(scheduler.base_scheduler).__name__,
              "num_inference_steps": scheduler.num_inference_steps, "nfe": scheduler.nfe,
              "lambdas": scheduler.lambdas, "grid": scheduler.grid, "fit": scheduler.fit_info}
    (folder / LAMBDAS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


@pytest.mark.parametrize("kind", ["plain", "grid"])
def test_the_previous_format_loads_with_a_warning_and_converts(gmm, fitted, kind, tmp_path):
    scheduler = fitted[kind]
    save_previous_format(scheduler, tmp_path)
    assert saved_config(tmp_path)["_class_name"] == "DPMSolverMultistepScheduler"
    with pytest.warns(FutureWarning, match=r"previous format.*Convert it: dode\.DODEScheduler\.from_pretrained\(.*"
                                           r"\.save_pretrained\("):
        old = dode.DODEScheduler.from_pretrained(tmp_path)
    assert old.config == scheduler.config and torch.equal(samples(gmm, old), samples(gmm, scheduler))
    old.save_pretrained(tmp_path)  # converted in place: one file, no warning any more
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert dode.DODEScheduler.from_pretrained(tmp_path).config == scheduler.config


def test_the_previous_format_keeps_its_checks(gmm, tmp_path):
    zero = dode.DODEScheduler(dode.make_scheduler("ddim", gmm), [0.0] * 5, 5)
    record = save_previous_format(zero, tmp_path)
    path = tmp_path / LAMBDAS_FILE
    cases = [("{not json", "corrupt"), (dict(record, lambdas=[0.0] * 4), "4 lambdas for nfe=5"),
             (dict(record, nfe=6, lambdas=[0.0] * 6), "makes 5 model evaluations, but 6 lambdas"),
             (dict(record, base_scheduler="NoSuchScheduler"), "unknown scheduler 'NoSuchScheduler'")]
    for content, message in cases:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        warned = contextlib.nullcontext() if message == "corrupt" else pytest.warns(FutureWarning)
        with pytest.raises(ValueError, match=message), warned:
            dode.DODEScheduler.from_pretrained(tmp_path)
    unipc = dode.make_scheduler("unipc", gmm, GRID)
    save_previous_format(unipc, tmp_path)
    path.write_text(json.dumps(dict(json.loads(path.read_text()), grid=[100.0, 10.0, 20.0, 1.0])))
    with pytest.raises(ValueError, match="grid this scheduler cannot use.*strictly descending"), \
            pytest.warns(FutureWarning):
        dode.DODEScheduler.from_pretrained(tmp_path)


def test_the_new_format_keeps_the_checks_and_refuses_other_schedulers_folders(gmm, fitted, tmp_path):
    fitted["grid"].save_pretrained(tmp_path)
    config = saved_config(tmp_path)
    for content, message in [({**config, "grid": [100.0, 10.0, 20.0, 1.0]}, "grid this scheduler cannot use"),
                             ({**config, "lambdas": "many"}, "corrupt"),
                             ({**config, "num_inference_steps": 5}, "makes 5 model evaluations, but 4")]:
        (tmp_path / CONFIG_FILE).write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            dode.DODEScheduler.from_pretrained(tmp_path)
    DDIMScheduler().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="DDIMScheduler's config, not a saved DODEScheduler"):
        dode.DODEScheduler.from_pretrained(tmp_path)


def test_a_base_class_loading_the_folder_is_told_the_lambdas_are_ignored(fitted, tmp_path):
    fitted["plain"].save_pretrained(tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        base = DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert any("'lambdas'" in m and "not expected and will be ignored" in m for m in messages), messages
    assert base.config.use_lu_lambdas is True  # the base scheduler, on its own config
    # and the folder of the base scheduler such a load saves is not mistaken for a DODEScheduler's
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="not a saved DODEScheduler"):
        dode.DODEScheduler.from_pretrained(tmp_path / "base")


# ---------------------------------------------------------------------------------------------------------------
def test_attribute_writes_reach_the_base_or_are_refused(gmm, fitted):
    scheduler = copy.deepcopy(fitted["plain"])
    scheduler.set_timesteps(4)
    scheduler.timesteps = scheduler.timesteps.clone()  # state of the base scheduler: set there
    assert "timesteps" not in vars(scheduler) and scheduler.base_scheduler.timesteps is scheduler.timesteps
    with pytest.raises(AttributeError, match="'prediction_type'.*config value of its DPMSolverMultistepScheduler"):
        scheduler.prediction_type = "v_prediction"
    with pytest.raises(AttributeError, match="'no_such_thing'.*neither it nor its DPMSolverMultistepScheduler"):
        scheduler.no_such_thing = 1
    with pytest.raises(AttributeError):
        scheduler.nfe = 3
    # its own attributes, assigned or changed in place, are what its config says
    scheduler.lambdas = [0.0, 0.1, 0.2, 0.3]
    scheduler.lambdas[3] = 0.5
    scheduler.fit_info["note"] = {"values": (1, 2.5)}
    scheduler.grid = list(GRID)
    config = scheduler.config
    assert config["lambdas"] == [0.0, 0.1, 0.2, 0.5] and config["grid"] == GRID
    assert config["fit_info"]["note"] == {"values": [1, 2.5]}
    assert fitted["plain"].lambdas != scheduler.lambdas and "note" not in fitted["plain"].fit_info
    assert torch.equal(samples(gmm, dode.DODEScheduler.from_config(config)), samples(gmm, scheduler))


def test_push_to_hub_saves_and_uploads_the_config(fitted, tmp_path, monkeypatch):
    from diffusers import configuration_utils
    from diffusers.utils import hub_utils

    uploads = []

    def upload_folder(repo_id, folder_path, **kwargs):
        uploads.append((repo_id, {p.name: p.read_text() for p in sorted(Path(folder_path).iterdir())}, kwargs))

    def create_repo(repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    card = SimpleNamespace(save=lambda path: open(path, "w").write("card"))
    for module in (hub_utils, configuration_utils):
        monkeypatch.setattr(module, "create_repo", create_repo)
    monkeypatch.setattr(hub_utils, "upload_folder", upload_folder)
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *args, **kwargs: card)
    monkeypatch.setattr(hub_utils, "populate_model_card", lambda card, *args, **kwargs: card)
    scheduler = fitted["plain"]
    scheduler.push_to_hub("someone/d-dpm")
    scheduler.save_pretrained(tmp_path, push_to_hub=True, repo_id="someone/d-dpm-2", commit_message="lambdas")
    (first, files, _), (second, saved, options) = uploads
    assert first == "someone/d-dpm" and set(files) == {CONFIG_FILE, "README.md"}
    assert json.loads(files[CONFIG_FILE]) == json.loads(saved[CONFIG_FILE]) == saved_config(tmp_path)
    assert json.loads(files[CONFIG_FILE])["lambdas"] == scheduler.lambdas
    assert second == "someone/d-dpm-2" and options["commit_message"] == "lambdas"
