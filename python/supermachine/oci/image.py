"""Pulling images into the cache (from a registry or a local source) and loading them back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from supermachine.errors import ManifestError
from supermachine.oci.auth import Credentials
from supermachine.oci.manifest import (
    INDEX_TYPES,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    sniff_media_type,
)
from supermachine.oci.progress import ProgressReporter
from supermachine.oci.reference import Reference
from supermachine.oci.registry import Cancelled, RegistryClient
from supermachine.oci.sources import (
    LocalImage,
    LocalSource,
    _blob_name,
    _kind_of,
    open_container,
    parse_source,
    read_docker_archive,
    read_oci_layout,
)
from supermachine.oci.store import ImageRecord, ImageStore


@dataclass(frozen=True)
class Image:
    """A stored image: its index record, manifest and parsed config."""

    record: ImageRecord
    manifest: Manifest
    config: ImageConfig
    store: ImageStore

    @property
    def ref(self) -> str:
        return self.record.ref

    @property
    def config_digest(self) -> str:
        return self.record.config_digest

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        return self.manifest.layers


def load_image(ref: str, store: ImageStore | None = None) -> Image:
    """An image already in the cache, by any spelling of its ref or by id; never touches the network."""
    store = store or ImageStore()
    record = store.resolve(ref)
    manifest = Manifest.parse(
        store.blobs.read_bytes(record.manifest_digest), f"manifest {record.manifest_digest}"
    )
    config = ImageConfig.parse(store.blobs.read_bytes(record.config_digest), f"config {record.config_digest}")
    return Image(record, manifest, config, store)


def _platform(platform: str | Platform | None) -> tuple[Platform, bool]:
    if platform is None:
        return Platform.default(), False
    return (platform if isinstance(platform, Platform) else Platform.parse(platform)), True


def _check(config: ImageConfig, manifest: Manifest, wanted: Platform, explicit: bool, what: str) -> None:
    if config.diff_ids and len(config.diff_ids) != len(manifest.layers):
        raise ManifestError(
            f"{what}: config lists {len(config.diff_ids)} layers but the manifest has {len(manifest.layers)}"
        )
    if explicit and config.os and not wanted.matches(config.platform):
        raise ManifestError(f"{what} is for {config.platform}, not {wanted}")


def pull(
    ref: str,
    *,
    platform: str | Platform | None = None,
    insecure: bool | None = None,
    credentials: Credentials | None = None,
    store: ImageStore | None = None,
    progress: ProgressReporter | None = None,
    jobs: int = 4,
    retries: int = 5,
) -> Image:
    """Fetch ``ref`` into the cache and record it; returns the stored :class:`Image`.

    ``ref`` is a registry reference (``alpine``, ``host:5000/x/y:tag``, ``name@sha256:…``) or a local
    source (``oci:PATH[:TAG]``, ``docker-archive:PATH``, or a plain path). ``platform`` picks the
    image out of a multi-platform index (default ``linux/amd64``). Blobs already cached are not
    fetched again; every blob is verified against its digest and size before it is kept.
    """
    store = store or ImageStore()
    wanted, explicit = _platform(platform)
    source = parse_source(ref)
    with store.using():
        if isinstance(source, LocalSource):
            record, manifest, config = _import_local(source, store, wanted, explicit, progress)
        else:
            with RegistryClient(
                source, insecure=insecure, credentials=credentials, retries=retries
            ) as client:
                record, manifest, config = _pull_registry(
                    source, client, store, wanted, explicit, progress, jobs
                )
        store.add(record)
    return Image(record, manifest, config, store)


def _pull_registry(
    ref: Reference,
    client: RegistryClient,
    store: ImageStore,
    wanted: Platform,
    explicit: bool,
    progress: ProgressReporter | None,
    jobs: int,
) -> tuple[ImageRecord, Manifest, ImageConfig]:
    raw, media_type, digest = client.get_manifest(ref.repository, ref.reference)
    what = f"manifest {ref}"
    index_digest: str | None = None
    if sniff_media_type(raw, media_type, what) in INDEX_TYPES:
        index_digest = store.blobs.put_bytes(raw, digest, "image index")
        chosen = Index.parse(raw, f"image index {ref}").select(wanted, f"image index {ref}")
        raw, media_type, digest = client.get_manifest(ref.repository, chosen.digest)
        what = f"manifest {ref.name}@{digest}"
        if sniff_media_type(raw, media_type, what) in INDEX_TYPES:
            raise ManifestError(f"{what} is another image index; nested indexes are not supported")
    manifest = Manifest.parse(raw, what)
    fetch = _downloader(client, ref.repository, store, progress)
    fetch(manifest.config, "config", None)
    config = ImageConfig.parse(
        store.blobs.read_bytes(manifest.config.digest), f"config {manifest.config.digest}"
    )
    _check(config, manifest, wanted, explicit, what)
    _parallel(fetch, manifest.layers, jobs)
    store.blobs.put_bytes(raw, digest, "manifest")
    record = ImageRecord(
        ref=str(ref),
        manifest_digest=digest,
        config_digest=manifest.config.digest,
        layers=tuple(d.digest for d in manifest.layers),
        size=manifest.config.size + sum(d.size for d in manifest.layers),
        platform=str(config.platform),
        source="registry",
        pulled_at=time.time(),
        index_digest=index_digest,
    )
    return record, manifest, config


_Fetch = Callable[[Descriptor, str, "threading.Event | None"], None]


def _downloader(
    client: RegistryClient, repository: str, store: ImageStore, progress: ProgressReporter | None
) -> _Fetch:
    def fetch(desc: Descriptor, label: str, cancel: threading.Event | None) -> None:
        key = desc.digest
        if progress:
            progress.start(key, f"{label} {desc.digest[7:19]}", desc.size)
        with store.blobs.lock(desc.digest):
            state = store.blobs.cached(desc.digest, desc.size)
            if state == "valid":
                if progress:
                    progress.finish(key, "cached")
                return
            writer = store.blobs.writer(desc.digest, desc.size, resume=True, what=label)
            try:
                client.fetch_blob(
                    repository,
                    desc,
                    writer,
                    on_progress=(lambda n: progress.update(key, n)) if progress else None,
                    cancel=cancel,
                )
                writer.commit()
            except BaseException:
                writer.close()  # keeps a resumable partial unless the writer already discarded it
                raise
        if progress:
            progress.finish(key, _CORRUPT_NOTE if state == "discarded" else "done")

    return fetch


# Said (on the progress bar, and logged by the store) when a cached copy did not match its digest.
_CORRUPT_NOTE = "done (the cached copy was corrupt: discarded and fetched again)"


def _parallel(fetch: _Fetch, layers: tuple[Descriptor, ...], jobs: int) -> None:
    """Download layers on a thread pool; the first failure cancels what has not started yet."""
    unique = list({d.digest: d for d in layers}.values())
    if not unique:
        return
    cancel = threading.Event()
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(unique))), thread_name_prefix="pull") as pool:
        futures: list[Future[None]] = [
            pool.submit(fetch, d, f"layer {i + 1}/{len(unique)}", cancel) for i, d in enumerate(unique)
        ]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            for f in futures:
                f.cancel()
            # Downloads already running finish (they are verified and useful later); then report.
            wait(futures)
            errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
            first = next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
            raise first  # type: ignore[misc]


def _import_local(
    source: LocalSource,
    store: ImageStore,
    wanted: Platform,
    explicit: bool,
    progress: ProgressReporter | None,
) -> tuple[ImageRecord, Manifest, ImageConfig]:
    with open_container(source.path) as container:
        kind = _kind_of(container, source)
        layer_files: dict[str, str]
        if kind == "oci":
            image: LocalImage = read_oci_layout(container, source, wanted)
            layer_files = {d.digest: _blob_name(d.digest) for d in image.manifest.layers}
        else:
            image, pairs = read_docker_archive(container, source)
            layer_files = {digest: name for name, digest in pairs}
        manifest = image.manifest
        config = ImageConfig.parse(image.config_raw, f"config {manifest.config.digest}")
        _check(config, manifest, wanted, explicit, f"{source}")
        for i, desc in enumerate(manifest.layers):
            if progress:
                progress.start(
                    desc.digest, f"layer {i + 1}/{len(manifest.layers)} {desc.digest[7:19]}", desc.size
                )
            with store.blobs.lock(desc.digest):
                state = store.blobs.cached(desc.digest, desc.size)
            if state != "valid":
                with container.open(layer_files[desc.digest]) as f:
                    store.blobs.put_stream(desc.digest, desc.size, f, "layer")
            if progress:
                progress.finish(desc.digest, _CORRUPT_NOTE if state == "discarded" else "imported")
        config_digest = store.blobs.put_bytes(image.config_raw, manifest.config.digest, "config")
        manifest_digest = store.blobs.put_bytes(image.manifest_raw, None, "manifest")
        index_digest = (
            store.blobs.put_bytes(image.index_raw, None, "image index") if image.index_raw else None
        )
    record = ImageRecord(
        ref=image.key,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layers=tuple(d.digest for d in manifest.layers),
        size=manifest.config.size + sum(d.size for d in manifest.layers),
        platform=str(config.platform),
        source=image.source,
        pulled_at=time.time(),
        index_digest=index_digest,
    )
    return record, manifest, config
