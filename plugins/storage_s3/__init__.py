"""Storage plugin ``s3`` (aioboto3): not implemented yet (issue 3).

It registers through the entry-point group like every plugin and implements no hook, so
``storage.backend = "s3"`` is refused at start with a clear error.
"""
