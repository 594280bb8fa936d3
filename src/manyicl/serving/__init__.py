"""``manyicl serve``: one model answering many tasks, each registered once by its demonstrations and kept as a
cached key/value prefix (docs/SERVING.md)."""
