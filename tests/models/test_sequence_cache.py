"""Which cached positions a new prompt may keep (models/generation/sequence_cache.py), where a
Llama 3.2 Vision cache's rows depend on the images its <|image|> tokens stand for."""
import pytest

from models.generation.sequence_cache import shared_prefix

I = 99  # the image token


@pytest.mark.parametrize("cached, seen, ids, images, kept", [
    ([1, 2, 3, 4], (), [1, 2, 3, 5], (), 3),                        # text: the common prefix
    ([1, 2, 3, 4], (), [1, 2, 3, 4], (), 4),
    ([1, I, 3, 4], ("cat",), [1, I, 3, 4, 5], ("cat",), 4),         # the same picture: all of it
    ([1, 2, I, 3, 4], ("cat",), [1, 2, I, 3, 4], ("dog",), 2),      # another: the text before it
    ([1, I, 3, I, 4], ("cat", "dog"), [1, I, 3, I, 4], ("cat", "owl"), 3),
    ([1, I, 3, 4], ("cat",), [1, 2, 3, 4], (), 1),                   # text where the image was
    ([1, 2, 3], (), [1, 2, 3, I, 4], ("cat",), 3),                   # an image after the cached text
    # consecutive image tokens share the last one's span: the run is recomputed
    ([1, I, 3], ("cat",), [1, I, I, 3], ("cat", "dog"), 1),
    ([1, I, I, 3], ("cat", "dog"), [1, I, I, 4], ("cat", "dog"), 3),
    ([1, I, I, 3], ("cat", "dog"), [1, I, I], ("cat", "dog"), 3),
    ([1, I, I, 3], ("cat", "dog"), [1, I, I, I], ("cat", "dog", "owl"), 1),
])
def test_a_cached_prefix_is_kept_up_to_the_first_other_image(cached, seen, ids, images, kept):
    assert shared_prefix(cached, seen, ids, images, I) == kept


def test_a_text_model_keeps_the_common_prefix():
    assert shared_prefix([1, I, 3], (), [1, I, 3, 4], (), None) == 3
