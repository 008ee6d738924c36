"""The API's boxes are integer pixels (the README's example), the smallest pixel box holding the detector's."""

from __future__ import annotations

import json

import numpy as np

from embed.pipeline import DETECTOR, MERGED, QueryEmbedding, Region, region_dict


def test_detections_and_region_boxes_are_integer_pixels_holding_the_float_box():
    regions = [Region((112.4, 40.6, 387.2, 300.01), 0.93, DETECTOR), Region((20.0, 210.5, 90.9, 299.5), 0.1234567, DETECTOR),
               Region((20.0, 40.6, 387.2, 300.01), 0.5, MERGED)]
    query = QueryEmbedding((400, 320), regions, np.zeros((3, 4), np.float32))
    dets = query.detections()
    assert [d["box"] for d in dets] == [[112, 40, 388, 301], [20, 210, 91, 300]]
    assert all(type(v) is int for d in dets for v in d["box"])
    assert dets[1]["score"] == 0.1235
    assert query.region(2) == {"box": [20, 40, 388, 301], "score": 0.5, "source": MERGED}
    # In the JSON body: no fractional pixel.
    assert '"box": [112, 40, 388, 301]' in json.dumps(dets)
    # Already integral (the whole image, a box sent by the client) stays the same.
    assert region_dict(Region((0.0, 0.0, 200.0, 100.0), 0.0, "whole_image"))["box"] == [0, 0, 200, 100]
    assert region_dict(Region((np.float32(3.0), np.float32(4.5), np.float32(9.5), np.float32(10.0)), np.float32(0.25)))\
        == {"box": [3, 4, 10, 10], "score": 0.25}
