"""Suite-wide settings."""


def pytest_collection_modifyitems(config, items):
    """The files holding slow tests first (stable order otherwise). Under pytest-xdist (`make test`:
    --dist loadfile) each worker takes whole files in this order, so the long ones start early and no
    worker is left alone with a long file at the end while the others idle."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
