

def test_columns_are_read_without_pandas():
    import pyarrow as pa

    from itm.indexer.store import categories, integers

    numbers = pa.chunked_array([pa.array([5, 1], pa.int64()), pa.array([7], pa.int64())])
    assert integers(numbers).tolist() == [5, 1, 7] and integers(numbers.slice(1, 2)).tolist() == [1, 7]
    assert integers(pa.chunked_array([pa.array([], pa.int32())])).dtype == "int32"

    column = pa.chunked_array([["image", "text", "image"], ["text", "segment-é", ""]])
    assert categories(column).tolist() == ["image", "text", "image", "text", "segment-é", ""]
    assert categories(column.slice(1, 3)).tolist() == ["text", "image", "text"]
    assert categories(pa.chunked_array([pa.array(["ab", "c"], pa.large_string())])).tolist() == ["ab", "c"]
    assert categories(pa.chunked_array([pa.array([], pa.string())])).tolist() == []
