"""A stand-in for ``torch.cuda.Event`` in CPU tests of code that waits for device work."""


class FakeEvent:
    """Arrived once ``done`` is set (or ``synchronize`` is called), as an event whose work
    has finished."""

    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True
