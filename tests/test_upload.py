"""``device_constant``: a model's constants uploaded once, equal to ``new_tensor``'s."""
import torch

from turbox_mm.utils.upload import device_constant


def test_equals_new_tensor_and_is_cached_per_values_device_and_dtype():
    like = torch.zeros(2, dtype=torch.float32)
    got = device_constant([0.1, 0.2, 2.0], like)
    assert torch.equal(got, like.new_tensor([0.1, 0.2, 2.0])) and got.dtype == torch.float32
    assert device_constant((0.1, 0.2, 2), like) is got  # lists, tuples and ints alike
    wide = device_constant([0.1, 0.2, 2.0], like.double())
    assert wide is not got and torch.equal(wide, like.double().new_tensor([0.1, 0.2, 2.0]))
    table = device_constant([[1.0, 2.0], [3.0, 4.0]], like)  # nested, as a weight table
    assert table.shape == (2, 2) and table.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_first_made_under_inference_mode_it_still_serves_autograd():
    with torch.inference_mode():
        weights = device_constant([3.0, 5.0], torch.zeros(1, dtype=torch.float64))
    assert not weights.is_inference()
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    (x * weights).sum().backward()  # an inference tensor cannot be saved for backward
    assert x.grad.tolist() == [3.0, 5.0]
