"""Hugging Face Hub integration: loading our pipelines through diffusers, and pushing them with our model cards."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import inspect
import os
import tempfile
from pathlib import Path

import diffusers
from diffusers.pipelines import pipeline_utils
from huggingface_hub import HfApi, ModelCard, ModelCardData

PACKAGE = "pixel_diffusers"


def _is_ours(library: object) -> bool:
    return isinstance(library, str) and (library == PACKAGE or library.startswith(PACKAGE + "."))


def _exempt_our_components(check):
    """Wraps diffusers' custom-component check so that components from this package pass it.

    `DiffusionPipeline.download` accepts a component library only if it is diffusers, transformers, a module shipped
    as a file in the repository, or a diffusers pipeline module. Whenever a file listing of the repository exists
    (online, or offline from the `trees/` listing newer huggingface_hub caches) every `pixel_diffusers.*` component
    fails that check, although the library is installed and imported. The wrapper hides our (already imported)
    components from the check; everything else, including remote-code components, is checked as before.
    """

    @functools.wraps(check)
    def checked(pretrained_model_name, config_dict, *args, **kwargs):
        config_dict = {
            key: [None, value[1]] if isinstance(value, list) and _is_ours(value[0]) else value
            for key, value in config_dict.items()
        }
        return check(pretrained_model_name, config_dict, *args, **kwargs)

    checked.__pixel_diffusers_exempt__ = True
    return checked


def register_with_diffusers(*classes: type) -> None:
    """Lets `diffusers.DiffusionPipeline.from_pretrained` load our pipelines, from folders and from Hub repo ids.

    diffusers resolves a `model_index.json` `_class_name` (and a component listed as `["diffusers", name]`) in its
    own namespace only, so the classes are exposed there, unless diffusers has a class of that name itself; and the
    custom-component check of `DiffusionPipeline.download` is taught to accept our components.
    """
    for cls in classes:
        if getattr(diffusers, cls.__name__, cls) is cls or _is_ours(getattr(diffusers, cls.__name__).__module__):
            setattr(diffusers, cls.__name__, cls)
    check = pipeline_utils._get_custom_components_and_folders
    if not getattr(check, "__pixel_diffusers_exempt__", False):
        pipeline_utils._get_custom_components_and_folders = _exempt_our_components(check)


def install_command() -> str:
    """The pip command that installs this package. It is installed from its source repository (there is no release
    on a package index): `git+URL` when the installed metadata names the repository, else an editable install of a
    clone."""
    try:
        metadata = importlib.metadata.metadata("pixel-diffusers")
    except importlib.metadata.PackageNotFoundError:
        metadata = None
    urls = []
    if metadata is not None:
        urls = [metadata.get("Home-page")] + [u.split(",")[-1].strip() for u in metadata.get_all("Project-URL") or []]
    url = next((u for u in urls if u and u.startswith("https://")), None)
    if url:
        return f'pip install "pixel-diffusers @ git+{url}"'
    return "pip install -e path/to/pixel_diffusers  # a clone of its source repository (it is not on a package index)"


# Exception classes (by name: they come from httpx, httpcore, socket or huggingface_hub) meaning "no connection".
_UNREACHABLE = ("OfflineModeIsEnabled", "ConnectError", "ConnectTimeout", "ConnectionError", "gaierror", "Timeout")


def unreachable_hub_cause(error: BaseException) -> BaseException | None:
    """The root "cannot connect" exception behind `error` (offline mode, DNS, refused, timeout), or None."""
    causes, seen = [], error
    while seen is not None and len(causes) < 32:
        causes.append(seen)
        seen = seen.__cause__ or seen.__context__
    hits = [c for c in causes if isinstance(c, ConnectionError) or any(n in type(c).__name__ for n in _UNREACHABLE)]
    return hits[-1] if hits else None


def register_text_to_image_pipelines(**pipelines: type) -> None:
    """Makes `AutoPipelineForText2Image.from_pretrained` load saved folders of our text-to-image pipelines.

    diffusers has no registration API for auto pipelines; it finds the class through its task mapping (model name ->
    pipeline class), so our classes are added to that mapping under `pipelines`' names. Pipelines of tasks without an
    auto class (class-conditional, unconditional, text-to-text) are not registered."""
    from diffusers.pipelines import auto_pipeline

    for model_name, cls in pipelines.items():
        auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING.setdefault(model_name, cls)


def _count_parameters(module) -> int | None:
    return sum(p.numel() for p in module.parameters()) if hasattr(module, "parameters") else None


class PixelDiffusersHubMixin:
    """`push_to_hub` and `save_pretrained(..., push_to_hub=True)` that upload the pipeline with our model card.

    Subclasses name their template in `model_cards/` with `_model_card_template` and their Hub task with
    `_pipeline_tag`. Extra template fields (a training configuration, a sample grid path) come in `model_card_kwargs`.
    """

    _model_card_template: str
    _pipeline_tag = "text-to-image"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`; a Hub id that cannot be fetched because the Hub is unreachable raises an
        OSError that says so and names the root cause (instead of only "not fully cached locally")."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as error:
            cause = unreachable_hub_cause(error)
            if cause is None or Path(str(pretrained_model_name_or_path)).exists():
                raise
            raise OSError(
                f"Cannot load {str(pretrained_model_name_or_path)!r}: it is not a local folder, it is not in the Hub "
                f"cache, and the Hugging Face Hub could not be reached ({type(cause).__name__}: {cause}). Check the "
                "folder path or repo id and the network (with HF_HUB_OFFLINE=1 only cached models load)."
            ) from error

    def model_card(self, repo_id: str, **model_card_kwargs) -> ModelCard:
        """Renders this pipeline's model card for `repo_id` from its template."""
        components = []
        for name, component in self.components.items():
            if component is not None:
                parameters = _count_parameters(component)
                components.append(
                    {
                        "name": name,
                        "cls": type(component).__name__,
                        "parameters": f"{parameters:,}" if parameters is not None else "",
                    }
                )
        card_data = ModelCardData(
            library_name="diffusers",
            pipeline_tag=self._pipeline_tag,
            license=model_card_kwargs.pop("license", "apache-2.0"),
            base_model=model_card_kwargs.pop("base_model", None),
            tags=["pixel_diffusers", "diffusers", self._pipeline_tag, "pixel-space", type(self).__name__],
        )
        model = self.components.get("transformer") or self.components.get("unet")
        fields = {
            "install": install_command(),
            "model_config": dict(model.config) if model is not None else {},
            "color_levels": self.config.get("color_levels"),
            "repo_id": repo_id,
            "pipeline_class": type(self).__name__,
            "components": components,
            "prompt": "a red circle on a blue background",
            "num_inference_steps": inspect.signature(self.__call__).parameters["num_inference_steps"].default,
            "height": getattr(self, "default_sample_size", 512),
            "width": getattr(self, "default_sample_size", 512),
        }
        fields.update(model_card_kwargs)
        template = importlib.resources.files(f"{PACKAGE}.model_cards") / self._model_card_template
        with importlib.resources.as_file(template) as template_path:
            return ModelCard.from_template(card_data, template_path=str(template_path), **fields)

    def _upload(self, folder, repo_id, token=None, private=None, commit_message=None, create_pr=False, model_card_kwargs=None):
        api = HfApi(token=token)
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            self.model_card(repo_id, **(model_card_kwargs or {})).save(os.path.join(folder, "README.md"))
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                create_pr=create_pr,
            )
        except Exception as error:
            cause = unreachable_hub_cause(error)
            if cause is None:
                raise
            raise OSError(
                f"Cannot push to the Hub repo {repo_id!r}: the Hugging Face Hub could not be reached "
                f"({type(cause).__name__}: {cause}). Nothing was uploaded; `save_pretrained(folder)` keeps the "
                "pipeline locally, and `push_to_hub` can be run again once online."
            ) from error

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        """diffusers' `save_pretrained`; with `push_to_hub=True` the folder is uploaded with this pipeline's model card.

        Hub arguments: `repo_id` (default: the folder name), `token`, `private`, `commit_message`, `create_pr`,
        `model_card_kwargs`.
        """
        hub_kwargs = {
            key: kwargs.pop(key)
            for key in ("repo_id", "token", "private", "commit_message", "create_pr", "model_card_kwargs")
            if key in kwargs
        }
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=False,
            **kwargs,
        )
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", Path(save_directory).name)
            self._upload(str(save_directory), repo_id, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        model_card_kwargs: dict | None = None,
    ):
        """Uploads the pipeline (all components, `model_index.json` and the model card) to the Hub repo `repo_id`."""
        with tempfile.TemporaryDirectory() as folder:
            super().save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return self._upload(folder, repo_id, token, private, commit_message, create_pr, model_card_kwargs)
