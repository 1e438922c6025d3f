"""tools.testbed.judge.ColourJudge: a colour counts only as an object-sized blob, at any image size."""

from tools.testbed import judge, shapes


def scene(size, speck):
    """A blue square (a real object) and a red speck of `speck` x `speck` pixels at 128 px, scaled to `size`."""
    image = shapes.render(shapes.Scene([shapes.Obj("blue", "square", shapes.SIZE_RANGE[0], 0.3, 0.3)]), size)
    k = speck * size // 128
    image[size - 20 * size // 128:size - 20 * size // 128 + k, size // 2:size // 2 + k] = shapes.COLOURS["red"]
    return image

def test_a_speck_of_colour_is_no_object_but_the_smallest_object_is():
    objects = [("blue", "square"), ("red", "circle")]
    for size in (64, 128, 256):
        assert judge.ColourJudge()(scene(size, 8), objects) == [True, False]     # 64 px at 128: a speck
        assert judge.ColourJudge()(scene(size, 16), objects) == [True, True]     # 256 px at 128: object-sized
    # the old rule (any blob of at least JudgeConfig.min_area, 49 px at 128) took the speck for a red object
    assert {d.colour for d in judge.detect(scene(128, 8))} == {"blue", "red"}
    # every shape at the smallest size the world draws is found, in every colour
    for shape in shapes.SHAPES:
        for colour in shapes.COLOURS:
            image = shapes.render(shapes.Scene([shapes.Obj(colour, shape, shapes.SIZE_RANGE[0], 0.5, 0.5)]), 128)
            assert judge.ColourJudge()(image, [(colour, shape)]) == [True]
    assert 0.01 < judge.smallest_object_area() < 0.03
