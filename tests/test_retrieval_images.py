"""Image archive retrieval on a real chromadb store: generated, seeded images (PNG, JPEG, GeoTIFF), the
shipped ImageNet stem as embedder, near-duplicate queries, captions for text→image, metadata."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.transform import Affine

from geochat.cli import main
from geochat.retrieval import IndexStore, Retriever, StoreLocation, index_docs, index_images
from geochat.retrieval.embedders import StemEmbedder
from geochat.retrieval.images import image_date
from geochat.retrieval.store import IMAGES, MixedEmbedderError
from geochat.retrieval.text import TextEmbedder
from tests.test_retrieval import write_docs

SIZE = 128


def _patterns(seed: int = 0) -> dict[str, np.ndarray]:
    """Six visually distinct (h, w, 3) uint8 scenes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    out = {}
    stripes = ((y // 8) % 2).astype(np.float32)
    out["stripes"] = np.stack([200 * stripes + 40, 60 * stripes + 40, 40 + 0 * stripes], -1)
    checker = (((y // 32) + (x // 32)) % 2).astype(np.float32)
    out["checker"] = np.stack([30 + 20 * checker, 90 + 120 * checker, 30 + 10 * checker], -1)
    noise = rng.normal(size=(SIZE // 8, SIZE // 8))
    blobs = np.kron(noise, np.ones((8, 8)))
    out["blobs"] = np.stack([40 + 0 * blobs, 80 + 30 * blobs, 160 + 60 * blobs], -1)
    out["gradient"] = np.stack([x * 2, y * 2, 255 - x], -1)
    r = np.hypot(x - SIZE / 2, y - SIZE / 2)
    rings = (np.sin(r / 3) > 0).astype(np.float32)
    out["rings"] = np.stack([150 * rings + 60, 150 * rings + 60, 60 + 0 * rings], -1)
    speck = rng.random((SIZE, SIZE))
    out["speckle"] = np.repeat((speck * 255)[..., None], 3, -1)
    texture = rng.normal(0, 10, (SIZE, SIZE, 1))  # scenes have grain; flat colour is not what archives hold
    return {k: np.clip(v + texture, 0, 255).astype(np.uint8) for k, v in out.items()}


def _near_duplicate(rgb: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    """Another capture of the same scene: brighter, a little noise, cropped by a few pixels, resampled."""
    noisy = rgb.astype(np.int16) + rng.integers(-4, 5, rgb.shape) + 8
    crop = np.clip(noisy, 0, 255).astype(np.uint8)[3:-3, 2:-4]
    return np.asarray(Image.fromarray(crop).resize((SIZE + 22, SIZE + 22), Image.Resampling.BILINEAR))


def _write_geotiff(path: Path, rgb: np.ndarray) -> None:
    profile = {"driver": "GTiff", "width": SIZE, "height": SIZE, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": Affine(10, 0, 500000, 0, -10, 5000000)}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(rgb.transpose(2, 0, 1))
        ds.update_tags(TIFFTAG_DATETIME="2021:06:15 10:30:00")


def make_archive(root: Path) -> dict[str, Path]:
    """Seeded images in several formats, a sidecar caption and an annotations.jsonl."""
    (root / "sub").mkdir(parents=True)
    imgs = _patterns()
    paths = {
        "stripes": root / "stripes.png", "checker": root / "checker.png", "blobs": root / "sub" / "blobs.png",
        "gradient": root / "scene_20190704.jpg", "rings": root / "sub" / "rings.png", "speckle": root / "speckle.tif",
    }
    for name, path in paths.items():
        if path.suffix == ".tif":
            _write_geotiff(path, imgs[name])
        else:
            Image.fromarray(imgs[name]).save(path, quality=95)
    (root / "checker.txt").write_text("a chessboard of green fields\n")
    (root / "annotations.jsonl").write_text(json.dumps(
        {"image": "sub/rings.png", "captions": ["concentric circular irrigation rings", "round fields"],
         "label": "farmland"}) + "\n")
    return paths


@pytest.fixture(scope="module")
def stem() -> StemEmbedder:
    return StemEmbedder()


@pytest.fixture(scope="module")
def text() -> TextEmbedder:
    return TextEmbedder()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, stem: StemEmbedder, text: TextEmbedder) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("archive")
    paths = make_archive(root / "images")
    store = IndexStore.open(StoreLocation(path=root / "index"), create=True)
    index_docs(store, write_docs(root / "docs"), embedder=text, progress=False)
    report = index_images(store, root / "images", embedder=stem, text_embedder=text, progress=False)
    assert report.files == 6 and report.chunks_embedded == 6 and not report.failed_files
    return root / "index", paths


def test_near_duplicates_find_their_original(archive: tuple[Path, dict[str, Path]], text: TextEmbedder) -> None:
    index, paths = archive
    retriever = Retriever(IndexStore.open(StoreLocation(path=index)), k=3, text_embedder=text)
    for seed, (name, rgb) in enumerate(_patterns().items()):
        hits = retriever.similar_images(_near_duplicate(rgb, seed))
        assert hits[0].path == str(paths[name].resolve()), (name, [h.path for h in hits])
        assert hits[0].score > hits[1].score


def test_metadata_and_text_search_through_captions(archive: tuple[Path, dict[str, Path]], text: TextEmbedder) -> None:
    index, paths = archive
    retriever = Retriever(IndexStore.open(StoreLocation(path=index)), k=6, text_embedder=text)
    hits = retriever.search_images("circular irrigation fields")
    assert hits[0].path == str(paths["rings"].resolve())
    assert hits[0].metadata["caption"] == "concentric circular irrigation rings"
    assert hits[0].metadata["label"] == "farmland"
    assert {h.path for h in hits} == {str(paths["rings"].resolve()), str(paths["checker"].resolve())}  # captioned only
    tif = retriever.similar_images(paths["speckle"])[0]
    assert tif.path == str(paths["speckle"].resolve())
    assert tif.metadata["crs"] == "EPSG:32633" and tif.metadata["date"] == "2021-06-15"
    west, south, east, north = tif.metadata["bounds_lonlat"]
    assert 14 < west < east < 16 and 44 < south < north < 46  # UTM 33N, 500 km E, 5000 km N
    assert image_date(paths["gradient"]) == "2019-07-04"


def test_incremental_image_reindex(tmp_path: Path, stem: StemEmbedder, text: TextEmbedder) -> None:
    paths = make_archive(tmp_path / "images")
    store = IndexStore.open(StoreLocation(path=tmp_path / "index"), create=True)
    index_images(store, tmp_path / "images", embedder=stem, text_embedder=text, progress=False)
    again = index_images(store, tmp_path / "images", embedder=stem, text_embedder=text, progress=False)
    assert again.chunks_embedded == 0 and again.skipped == 6
    paths["checker"].unlink()
    Image.fromarray(_patterns(seed=1)["blobs"]).save(paths["blobs"])  # changed content
    third = index_images(store, tmp_path / "images", embedder=stem, text_embedder=text, progress=False)
    assert third.removed_files == [str(paths["checker"].resolve())]
    assert third.embedded_files == [str(paths["blobs"])] and third.total_records == 5
    retriever = Retriever(store, text_embedder=text)
    assert all(h.path != str(paths["checker"].resolve()) for h in retriever.search_images("green chessboard"))


def test_search_cli_with_image(archive: tuple[Path, dict[str, Path]], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    index, paths = archive
    query = tmp_path / "query.png"
    Image.fromarray(_near_duplicate(_patterns()["stripes"], 7)).save(query)
    assert main(["search", "--image", str(query), "--k", "2", "--json", "--index-dir", str(index)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passages"] == [] and len(data["images"]) == 2
    assert set(data["images"][0]) == {"path", "score", "metadata"}
    assert data["images"][0]["path"] == str(paths["stripes"].resolve())

    assert main(["search", "round irrigation", "--k", "1", "--json", "--index-dir", str(index)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["images"][0]["path"] == str(paths["rings"].resolve()) and len(data["passages"]) == 1


def test_trained_tower_is_swappable_and_never_mixed(
    tmp_path: Path, text: TextEmbedder, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dual-encoder tower (tiny, conv stem) replaces the stem embedder; its text side searches images
    directly; indexing the same collection with the stem afterwards is refused, `auto` keeps its tower, and
    the tower retrained in place is refused until the archive is rebuilt."""
    from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel
    from geochat.retrieval.embedders import TowerEmbedder
    from geochat.train.dual_encoder import save_tower
    from tests.tiny import TINY_VISION

    config = GeoHybridVisionConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"} | {"projection_dim": 384})
    torch.manual_seed(0)
    save_tower(GeoHybridVisionModel(config), tmp_path / "dual")
    paths = make_archive(tmp_path / "images")
    index = tmp_path / "index"
    tower = TowerEmbedder(tmp_path / "dual")
    store = IndexStore.open(StoreLocation(path=index), create=True)
    index_images(store, tmp_path / "images", embedder=tower, text_embedder=text, progress=False)

    retriever = Retriever(IndexStore.open(StoreLocation(path=index)), k=6, text_embedder=text)
    assert retriever.image_embedder is not None and retriever.image_embedder.name == tower.name
    assert len(retriever.search_images("farmland")) == 6  # the text side reaches uncaptioned images too
    assert retriever.similar_images(paths["rings"])[0].path == str(paths["rings"].resolve())

    capsys.readouterr()
    code = main(["index", "images", str(tmp_path / "images"), "--embedder", "stem", "--index-dir", str(index),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be mixed" in err and err.count("\n") == 1
    # `auto` (the default) grows an archive with the embedder it was built with, and says the default moved
    code = main(["index", "images", str(tmp_path / "images"), "--index-dir", str(index), "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["skipped"] == len(paths) and "--rebuild" in err
    assert IndexStore.open(StoreLocation(path=index)).embedder_of(IMAGES) == tower.name

    # retrained in place (same directory, other weights): queries and additions are refused until --rebuild
    torch.manual_seed(1)
    save_tower(GeoHybridVisionModel(config), tmp_path / "dual")
    stale = Retriever(IndexStore.open(StoreLocation(path=index)), k=6, text_embedder=text)
    with pytest.raises(MixedEmbedderError, match="--rebuild"):
        stale.search_images("farmland")
    args = ["index", "images", str(tmp_path / "images"), "--index-dir", str(index), "--no-progress"]
    assert main(args) == 2 and "retrained" in capsys.readouterr().err
    assert main([*args, "--rebuild"]) == 0
    fresh = Retriever(IndexStore.open(StoreLocation(path=index)), k=6, text_embedder=text)
    assert fresh.similar_images(paths["rings"])[0].path == str(paths["rings"].resolve())


def test_a_query_bank_beside_the_tower_reranks_text_search_by_hubness(tmp_path: Path, text: TextEmbedder,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A tower with a query bank ranks images for a text by cosine − the bank's hubness offset, and reports
    that score; an image that sits among many of the bank's caption keys drops below its cosine rank."""
    from geochat.model.weights import TRAINED_DEFAULT_DIR
    from geochat.retrieval.embedders import TowerEmbedder
    from geochat.retrieval.images import load_rgb
    from geochat.train.dual_encoder import QueryBank, save_query_bank

    # the shipped search tower (a random tiny one embeds every image alike), without its bank
    shutil.copytree(TRAINED_DEFAULT_DIR / "retrieval" / "vision", tmp_path / "dual" / "vision")
    paths = make_archive(tmp_path / "images")
    plain = TowerEmbedder(tmp_path / "dual")
    order = sorted(paths)
    emb = plain.embed_images([load_rgb(paths[name]) for name in order])
    query = plain.embed_text("farmland")
    cosine = emb @ query
    hub = int(np.argmax(cosine))  # the plain search's first hit, made the hub of the bank's caption keys
    gen = torch.Generator().manual_seed(1)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    keys = unit(torch.cat([torch.tensor(emb[hub]) + 0.05 * torch.randn(20, 384, generator=gen),
                           torch.randn(20, 384, generator=gen)]))
    save_query_bank(QueryBank(keys, unit(torch.randn(40, 384, generator=gen)), weight=0.0, hub_weight=1.0),
                    tmp_path / "dual")  # weight 0: queries as they are, only the ranking changes
    tower = TowerEmbedder(tmp_path / "dual")
    assert tower.bank is not None and np.allclose(tower.embed_text("farmland"), query, atol=1e-5)
    assert tower.text_offsets is not None and plain.text_offsets is None  # no bank, no correction
    offsets = tower.text_offsets(emb)
    assert offsets[hub] == offsets.max() and offsets[hub] > np.delete(offsets, hub).max() + 0.05
    expected = np.argsort(-(cosine - offsets), kind="stable")
    assert expected[0] != hub
    store = IndexStore.open(StoreLocation(path=tmp_path / "index"), create=True)
    index_images(store, tmp_path / "images", embedder=tower, text_embedder=text, progress=False)
    hits = Retriever(IndexStore.open(StoreLocation(path=tmp_path / "index")), k=6).search_images("farmland")
    assert [h.path for h in hits] == [str(paths[order[i]].resolve()) for i in expected]
    assert [h.score for h in hits] == pytest.approx([float(cosine[i] - offsets[i]) for i in expected], abs=2e-3)
    top = Retriever(IndexStore.open(StoreLocation(path=tmp_path / "index")), k=6).search_images("farmland", k=2)
    assert [h.path for h in top] == [h.path for h in hits[:2]]  # k below the pool: the same head
    # a pool of 4 (for k = 1): the hub competes only with the 3 next nearest by cosine
    monkeypatch.setattr("geochat.retrieval.retriever.RERANK_POOL", 1)
    pool = np.argsort(-cosine, kind="stable")[:4]
    best = pool[np.argmax(cosine[pool] - offsets[pool])]
    one = Retriever(IndexStore.open(StoreLocation(path=tmp_path / "index")), k=6).search_images("farmland", k=1)
    assert [h.path for h in one] == [str(paths[order[best]].resolve())]


def test_caption_edits_reindex_and_a_bad_sidecar_is_one_failed_file(tmp_path: Path, stem: StemEmbedder,
                                                                      text: TextEmbedder) -> None:
    paths = make_archive(tmp_path / "images")
    location = StoreLocation(path=tmp_path / "index")
    index_images(IndexStore.open(location, create=True), tmp_path / "images", embedder=stem, text_embedder=text,
                 progress=False)
    (tmp_path / "images" / "checker.txt").write_text("a forest\n")  # only the words changed
    (tmp_path / "images" / "stripes.txt").write_bytes(b"\xff\xfe not UTF-8\n")
    report = index_images(IndexStore.open(location), tmp_path / "images", embedder=stem, text_embedder=text,
                          progress=False)
    assert len(report.embedded_files) == 1 and report.embedded_files[0].endswith("checker.png")
    assert len(report.failed_files) == 1 and "stripes.png" in report.failed_files[0]
    retriever = Retriever(IndexStore.open(location), text_embedder=text)  # still searchable
    record = IndexStore.open(location).collection(IMAGES).get(include=["metadatas"])
    captions = {m["path"]: m["caption"] for m in record["metadatas"]}
    assert captions[str(paths["checker"].resolve())] == "a forest"
    assert retriever.similar_images(paths["rings"])[0].path == str(paths["rings"].resolve())


def test_an_unchanged_archive_is_not_read_again(tmp_path: Path, stem: StemEmbedder, text: TextEmbedder,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import geochat.retrieval.images as images_module

    paths = make_archive(tmp_path / "images")
    location = StoreLocation(path=tmp_path / "index")
    index_images(IndexStore.open(location, create=True), tmp_path / "images", embedder=stem, text_embedder=text,
                 progress=False)
    hashed: list[Path] = []
    real = images_module.file_digest
    monkeypatch.setattr(images_module, "file_digest", lambda p: hashed.append(p) or real(p))
    report = index_images(IndexStore.open(location), tmp_path / "images", embedder=stem, text_embedder=text,
                          progress=False)
    assert report.skipped == len(paths) and hashed == []  # same size and mtime: no byte of the archive read
    st = paths["stripes"].stat()
    os.utime(paths["stripes"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, not changed
    report = index_images(IndexStore.open(location), tmp_path / "images", embedder=stem, text_embedder=text,
                          progress=False)
    assert hashed == [paths["stripes"]] and report.skipped == len(paths)  # hashed again, same bytes: kept
    index_images(IndexStore.open(location), tmp_path / "images", embedder=stem, text_embedder=text, progress=False)
    assert hashed == [paths["stripes"]]  # its new stat was recorded: not hashed a third time


def test_a_killed_run_is_half_written_and_rebuild_repairs_it(tmp_path: Path, stem: StemEmbedder,
                                                              text: TextEmbedder) -> None:
    from geochat.retrieval.store import CorruptIndexError

    paths = make_archive(tmp_path / "images")
    location = StoreLocation(path=tmp_path / "index")
    store = IndexStore.open(location, create=True)
    index_images(store, tmp_path / "images", embedder=stem, text_embedder=text, progress=False)
    with store.writing():  # a run killed after marking the collection unfinished
        store.writable_collection(IMAGES, stem.name, stem.dim)
    with pytest.raises(CorruptIndexError, match="half-written"):  # not "another run": nobody holds the lock
        index_images(IndexStore.open(location), tmp_path / "images", embedder=stem, text_embedder=text,
                     progress=False)
    report = index_images(IndexStore.open(location), tmp_path / "images", embedder=stem, text_embedder=text,
                          rebuild=True, progress=False)
    assert len(report.embedded_files) == len(paths) and IndexStore.open(location).collection(IMAGES) is not None


def test_records_of_an_older_index_keep_their_vectors(tmp_path: Path, stem: StemEmbedder, text: TextEmbedder) -> None:
    """Before the content hash covered captions it was the file's own sha256: such records are not re-embedded."""
    from geochat.retrieval.embedders import file_digest

    paths = make_archive(tmp_path / "images")
    location = StoreLocation(path=tmp_path / "index")
    index_images(IndexStore.open(location, create=True), tmp_path / "images", embedder=stem, text_embedder=text,
                 progress=False)
    col = IndexStore.open(location).collection(IMAGES)
    got = col.get(include=["metadatas"])
    old = [{k: v for k, v in m.items() if k not in ("file_hash", "file_stat")} | {"content_hash": file_digest(Path(m["path"]))}
           for m in got["metadatas"]]
    col.update(ids=got["ids"], metadatas=old)
    report = index_images(IndexStore.open(location), tmp_path / "images", embedder=stem, text_embedder=text,
                          progress=False)
    assert report.skipped == len(paths) and report.embedded_files == []
    again = index_images(IndexStore.open(location), tmp_path / "images", embedder=stem, text_embedder=text,
                         progress=False)
    assert again.skipped == len(paths)  # the records now carry today's keys
    hit = Retriever(IndexStore.open(location), text_embedder=text).similar_images(paths["rings"])[0]
    assert set(hit.metadata) & {"content_hash", "file_hash", "file_stat", "path"} == set()  # bookkeeping stays out


def test_a_file_name_that_is_not_utf8_is_one_failed_file(tmp_path: Path, stem: StemEmbedder,
                                                         text: TextEmbedder) -> None:
    paths = make_archive(tmp_path / "images")
    shutil.copy(paths["rings"], os.fsencode(tmp_path / "images") + b"/bad\xff\xfename.png")
    location = StoreLocation(path=tmp_path / "index")
    for _ in range(2):  # and the archive is whole afterwards: a second run reads it
        report = index_images(IndexStore.open(location, create=True), tmp_path / "images", embedder=stem,
                              text_embedder=text, progress=False)
        assert len(report.failed_files) == 1 and "not valid UTF-8" in report.failed_files[0]
    assert report.skipped == len(paths)


def test_an_index_dir_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("not an index")
    assert main(["search", "ships", "--index-dir", str(tmp_path / "notes.txt")]) == 2
    assert "is a file, not an index folder" in capsys.readouterr().err
