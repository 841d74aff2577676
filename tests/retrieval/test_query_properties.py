"""Property-based tests of what users and clients type: query parts, filters, whole queries in JSON, and paths
as bytes. Formatting then parsing gives back what was formatted; anything else raises the documented QueryError."""
import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from itm.common.errors import QueryError
from itm.retrieval.query import JSON_FIELDS, SORTS, Filters, Part, Query, Refine

texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
weights = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False).filter(lambda w: w != 0)
dates = st.builds(lambda y, m, d, n: f"{y:04d}" + (f"-{m:02d}" if n > 0 else "") + (f"-{d:02d}" if n > 1 else ""),
                  st.integers(1900, 2100), st.integers(1, 12), st.integers(1, 28), st.integers(0, 2))


@given(weights, texts, st.sampled_from([1.0, -1.0]), st.booleans())
def test_a_part_reads_back_as_it_was_written(weight, value, sign, image):
    part = Part(sign * weight, None if image else value, value if image else None)
    assert Part.parse(part.format(), sign, image) == part


@given(texts)
def test_any_part_text_is_a_part_or_the_documented_error(value):
    try:
        part = Part.parse(value)
    except QueryError:
        return
    assert part.weight != 0 and part.text


@given(st.one_of(st.none(), texts), st.one_of(st.none(), dates), st.one_of(st.none(), dates),
       st.sampled_from([None, "", "..", "2024"]), st.one_of(st.none(), texts),
       st.one_of(st.none(), st.integers(0, 10_000)), st.one_of(st.none(), st.integers(0, 10_000)),
       st.sampled_from([None, "landscape", "portrait", "square"]))
def test_filters_read_back_as_they_were_written(path, lo, hi, date_form, camera, width, height, orientation):
    date = {None: None, "": lo, "..": f"{lo or ''}..{hi or ''}", "2024": "2024"}[date_form]
    size = None if width is None else f"{width}x{height}" if height is not None else str(width)
    try:
        filters = Filters.parse(path, date, camera, size, orientation)
    except QueryError:
        return  # an empty date range
    assert Filters.parse(**filters.format()) == filters


@given(st.dictionaries(st.sampled_from(["path", "date", "camera", "min_size", "orientation"]), texts))
def test_any_filter_text_is_filters_or_the_documented_error(forms):
    try:
        Filters.parse(**forms)
    except QueryError:
        pass


@st.composite
def queries(draw) -> Query:
    parts = tuple(draw(st.lists(st.one_of(
        st.builds(Part, weights, texts), st.builds(lambda w, b, n: Part(w, image=b, image_name=n), weights,
                                                   st.binary(min_size=1, max_size=30), texts),
        st.builds(lambda w, i: Part(w, image_id=i), weights, st.integers(0, 2**40))), max_size=3)))
    main = draw(st.sampled_from(["text", "image", "image_id", "image_path", None if parts else "text"]))
    value = {"text": draw(texts), "image": draw(st.binary(min_size=1, max_size=30)),
             "image_id": draw(st.integers(0, 2**40)), "image_path": draw(texts)}.get(main)
    refine = Refine(draw(st.one_of(st.none(), st.floats(0, 1))), draw(st.sampled_from(SORTS)),
                    draw(st.one_of(st.none(), st.floats(-1, 1))))
    return Query(**({main: value} if main else {}), k=draw(st.integers(1, 1000)),
                 kind=draw(st.sampled_from([None, "image", "text", "all"])), rerank_k=draw(st.integers(1, 1000)),
                 rerank=draw(st.booleans()), parts=parts, refine=refine,
                 filters=Filters(path=draw(st.one_of(st.none(), texts)))).checked()


@given(queries())
def test_a_query_survives_its_json_form(query):
    assert Query.from_json(json.loads(json.dumps(query.to_json()))) == query


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=8)


@settings(max_examples=300)
@given(st.one_of(json_values, st.dictionaries(st.sampled_from(sorted(JSON_FIELDS)), json_values, max_size=6)))
def test_any_json_is_a_query_or_the_documented_error(body):
    try:
        Query.from_json(body)
    except QueryError:
        pass


@given(st.binary(min_size=1, max_size=60).filter(lambda b: b"\0" not in b))
def test_a_path_of_any_bytes_survives_json_and_the_raw_output(raw):
    """A hit's path is os.fsdecode of the file system's bytes; --json writes it with \\udcXX escapes, and a
    reader's os.fsencode of the decoded JSON, like --paths-only, gives the exact bytes back."""
    path = os.fsdecode(raw)
    assert os.fsencode(json.loads(json.dumps({"path": path}, ensure_ascii=True))["path"]) == raw
