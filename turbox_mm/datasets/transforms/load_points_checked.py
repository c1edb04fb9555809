"""``LoadPointsFromFileChecked``: mmdet3d's ``LoadPointsFromFile``, naming the file on errors."""
import numpy as np
from mmdet3d.datasets.transforms import LoadPointsFromFile

from turbox_mm.registry import TRANSFORMS


@TRANSFORMS.register_module()
class LoadPointsFromFileChecked(LoadPointsFromFile):
    """mmdet3d's ``LoadPointsFromFile``: the same arguments and the same points, but a file
    that is missing, unreadable or not a whole number of ``load_dim``-value float32 points (a
    truncated ``.bin``, or the wrong ``load_dim``) raises an error naming it. mmdet3d's
    raises numpy's "cannot reshape array of size ..." without the file, or, for a truncation
    that happens to end on a point boundary, loads fewer points without a word (that case
    cannot be told from a smaller cloud and stays as it is).

    ``turbox.data.point_loaders`` puts it in place of mmdet3d's in every pipeline of a config,
    GT-paste's points loader included.

    Examples:
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), 'cut.bin')
        >>> np.zeros(7, np.float32).tofile(path)  # 1.4 points of 5 values
        >>> try:
        ...     LoadPointsFromFileChecked(coord_type='LIDAR', load_dim=5)._load_points(path)
        ... except ValueError as error:
        ...     print(path in str(error), 'holds 7 float32 values' in str(error))
        True True
    """

    def _load_points(self, pts_filename: str) -> np.ndarray:
        name = type(self).__name__
        try:
            points = super()._load_points(pts_filename)
        except FileNotFoundError as error:
            raise FileNotFoundError(f'{name}: point file not found: {pts_filename}') from error
        except (OSError, ValueError) as error:  # unreadable, or not a float32 array
            raise ValueError(f'{name}: cannot read points from {pts_filename}: {error}') \
                from error
        if points.size % self.load_dim:
            raise ValueError(f'{name}: {pts_filename} holds {points.size} float32 values, not '
                             f'a whole number of points of load_dim={self.load_dim} values (a '
                             'truncated file, or the wrong load_dim)')
        return points
