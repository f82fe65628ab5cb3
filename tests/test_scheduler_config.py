"""DODEScheduler as a diffusers ConfigMixin: its config, save/load (folders, subfolders, hub ids, pipelines), the
committed folders byte for byte, what base classes make of its folder, its spacing, attribute writes, push_to_hub
(no network); make_scheduler and grid_scheduler."""
from __future__ import annotations

import copy
import filecmp
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, \
    DPMSolverMultistepScheduler, UNet2DModel

import dode
from dode.models.pipelines import pipeline_model, use_dode
from dode.core.scheduler import CONFIG_FILE, OWN_KEYS, grid_scheduler, to_grid_form

RESULTS = Path(__file__).resolve().parents[1] / "results"

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


def public(config) -> dict:
    """A config without diffusers' in-memory keys (``_use_default_values``, which no scheduler saves)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


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
    assert public(loaded.config) == public(scheduler.config)
    assert torch.equal(samples(gmm, loaded), samples(gmm, scheduler))
    # load_config + from_config is from_pretrained, as in diffusers
    again = dode.DODEScheduler.from_config(dode.DODEScheduler.load_config(tmp_path))
    assert public(again.config) == public(scheduler.config) and torch.equal(samples(gmm, again), samples(gmm, scheduler))


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
    monkeypatch.setattr(dode.util.hub, "_hub_reachable", lambda timeout=3.0: False)
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
            scheduler = grid_scheduler("dpm_solver_pp_2m", model, GRID)
            scheduler.lambdas = [0.0, 0.4, -0.2, 0.6]
        else:
            scheduler = dode.DODEScheduler(dode.make_scheduler("ddim", model), [0.0, 0.5, -0.3, 0.8], 4)
        use_dode(pipe, scheduler)
        expected = pipe(**model.pipeline_inputs(3, 5), num_inference_steps=4, output_type="pt").images
        folder = tmp_path / pipeline_class.__name__
        pipe.save_pretrained(folder)
        # diffusers records a class outside its own libraries by its module
        assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["dode.core.scheduler",
                                                                                     "DODEScheduler"]
        reloaded = DiffusionPipeline.from_pretrained(folder)
        reloaded.set_progress_bar_config(disable=True)
        assert type(reloaded) is pipeline_class
        if pipeline_class is DDIMPipeline:  # it makes a DDIMScheduler of any scheduler: the base's schedule
            assert type(reloaded.scheduler) is DDIMScheduler
            assert reloaded.scheduler.config.beta_end == 0.015
            use_dode(reloaded, folder / "scheduler")  # as the README says
        assert isinstance(reloaded.scheduler, dode.DODEScheduler)
        assert public(reloaded.scheduler.config) == public(scheduler.config)
        got = reloaded(**model.pipeline_inputs(3, 5), num_inference_steps=4, output_type="pt").images
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_saved_config_keeps_its_checks_and_other_schedulers_folders_are_refused(gmm, fitted, tmp_path):
    fitted["grid"].save_pretrained(tmp_path)
    config = saved_config(tmp_path)
    for content, message in [({**config, "grid": [100.0, 10.0, 20.0, 1.0]}, "grid this scheduler cannot use"),
                             ("{not json", "corrupt"), ("[1, 2]", "corrupt.*JSON list"),
                             ({**config, "lambdas": "many"}, "corrupt"),
                             ({**config, "spacing": ["lu"]}, "corrupt.*spacing"),
                             ({**config, "lambdas": [0.0] * 3}, "3 lambdas for nfe=4"),
                             ({**config, "num_inference_steps": 5}, "makes 5 model evaluations, but 4"),
                             ({**config, "base_scheduler": "NoSuchScheduler"}, "unknown scheduler 'NoSuchScheduler'")]:
        (tmp_path / CONFIG_FILE).write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError, match=message):
            dode.DODEScheduler.from_pretrained(tmp_path)
    DDIMScheduler().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="DDIMScheduler's config, not a saved DODEScheduler"):
        dode.DODEScheduler.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no scheduler_config.json.*not a saved DODEScheduler"):
        dode.DODEScheduler.from_pretrained(tmp_path / "empty")


def test_a_folder_of_the_previous_format_is_not_a_saved_dode_scheduler(fitted, tmp_path):
    """The layout before one scheduler_config.json (the base scheduler's own config plus a dode_lambdas.json) is
    no longer read: loading it says what the folder is."""
    scheduler = fitted["plain"]
    scheduler.base_scheduler.save_pretrained(tmp_path)
    (tmp_path / "dode_lambdas.json").write_text(json.dumps(
        {"base_scheduler": type(scheduler.base_scheduler).__name__, "num_inference_steps": 4, "nfe": 4,
         "lambdas": scheduler.lambdas, "grid": None, "fit": {}}))
    for load in (dode.DODEScheduler.from_pretrained, dode.DODEScheduler.load_config, dode.DODEScheduler.from_config):
        with pytest.raises(ValueError, match=r"DPMSolverMultistepScheduler's config, not a saved DODEScheduler \(its "
                                             r"_class_name would be 'DODEScheduler'\)"):
            load(tmp_path)
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


# ---------------------------------------------------------------------------------------------------------------
# the committed folders: loading and saving again writes the same bytes
@pytest.mark.parametrize("folder", [
    "gmm-digits/schedulers/ddim-nfe4-dode",  # no fit record: the spacing its base config selects
    "gmm-digits/schedulers/dpm_solver_pp_2m-nfe4-dode-auto",
    "gmm-digits/schedulers/ddim-nfe5-dode-learned",  # DDIM's grid form with a learned grid
    "unet-digits/schedulers/dpm_solver_pp_2m-nfe5-dode-learned",  # a grid, and the spacing it started from
    "gmm-digits/schedulers/heun-nfe5-learned-grid",
])
def test_a_committed_folder_saves_again_byte_for_byte(folder, tmp_path):
    source = RESULTS / folder / CONFIG_FILE
    dode.DODEScheduler.from_pretrained(source.parent).save_pretrained(tmp_path)
    assert filecmp.cmp(source, tmp_path / CONFIG_FILE, shallow=False), folder
    again = dode.DODEScheduler.from_config(dode.DODEScheduler.load_config(source.parent))
    assert again.to_json_string() == source.read_text()


# ---------------------------------------------------------------------------------------------------------------
def test_the_spacing_is_given_or_follows_the_grid_and_the_base_config(gmm):
    base = dode.make_scheduler("dpm_solver_pp_2m", gmm, "karras")
    scheduler = dode.DODEScheduler(base, [0.0] * 4, 4, {"spacing": "lu"})
    assert scheduler.spacing == "karras" and scheduler.config["spacing"] == "karras"  # fit_info is a record only
    scheduler.grid = list(GRID)
    assert scheduler.spacing == "explicit"
    given = dode.DODEScheduler(base, [0.0] * 4, 4, grid=GRID, spacing="lu")
    assert given.spacing == "lu" and given.config["spacing"] == "lu" and "spacing='lu'" in repr(given)
    given.spacing = None  # back to what it follows
    assert given.spacing == "explicit" and "spacing=" not in repr(given)
    with pytest.raises(TypeError, match="spacing"):
        dode.DODEScheduler(base, [0.0] * 4, 4, spacing=["lu"])
    assert dode.DODEScheduler(DDPMScheduler(), [0.0] * 4, 4).spacing is None  # the scheduler of no dode solver
    # from_config, from_pretrained and to_grid_form keep a given spacing
    assert dode.DODEScheduler.from_config(dict(given.config, spacing="lu")).spacing == "lu"
    ddim = dode.DODEScheduler(dode.make_scheduler("ddim", gmm, "trailing"), [0.0, 0.5, 0.5, 0.5], 4, spacing="fitted")
    form = to_grid_form(ddim)
    assert form.spacing == "fitted" and form.grid is not None
    assert to_grid_form(dode.DODEScheduler(ddim.base_scheduler, ddim.lambdas, 4)).spacing == "explicit"


def test_make_scheduler_gives_diffusers_schedulers_and_grid_scheduler_zero_lambda_dode_schedulers(gmm):
    for solver in ("ddim", "dpm_solver_pp_2m", "heun"):
        assert not isinstance(dode.make_scheduler(solver, gmm), dode.DODEScheduler)
    with pytest.raises(ValueError, match=r"spacing name.*dode\.grid_scheduler\('ddim', model, levels\)"):
        dode.make_scheduler("ddim", gmm, [120.0, 9.0, 1.7, 0.4])
    with pytest.raises(ValueError, match="cannot take an explicit grid"):
        dode.make_scheduler("pndm", gmm, [120.0, 9.0, 1.7])
    for levels in (None, "karras"):
        with pytest.raises(ValueError, match="list of noise levels.*dode.make_scheduler"):
            grid_scheduler("ddim", gmm, levels)
    with pytest.raises(ValueError, match="cannot take an explicit grid"):
        grid_scheduler("pndm", gmm, [120.0, 9.0, 1.7])
    with pytest.raises(ValueError, match="strictly descending"):
        grid_scheduler("ddim", gmm, [1.0, 9.0])
    # DDIM on a grid: its grid form (iPNDM of order 1); the others their own scheduler; every lambda 0
    ddim = grid_scheduler("ddim", gmm, [120.0, 9.0, 1.7, 0.4])
    assert isinstance(ddim.base_scheduler, dode.IPNDMDiscreteScheduler) and ddim.base_scheduler.config.max_order == 1
    assert ddim.lambdas == [0.0] * 4 and ddim.num_inference_steps == 4 and ddim.spacing == "explicit"
    heun = grid_scheduler("heun", gmm, [80.0, 5.0, 0.5], use_karras_sigmas=False)
    assert heun.nfe == 5 and heun.grid == [80.0, 5.0, 0.5] and heun.base_scheduler.config.use_karras_sigmas is False
    # a list of levels in dode.sample is that scheduler
    for solver, levels in (("ddim", [120.0, 9.0, 1.7, 0.4]), ("dpm_solver_pp_2m", GRID)):
        scheduler = grid_scheduler(solver, gmm, levels)
        by_list = dode.sample(gmm, solver, 4, 6, seed=7, spacing=levels, progress=False)
        assert torch.equal(by_list, samples(gmm, scheduler))
    with pytest.raises(ValueError, match="makes 4 model evaluations with ddim, not 5"):
        dode.sample(gmm, "ddim", 5, 2, spacing=[120.0, 9.0, 1.7, 0.4], progress=False)
