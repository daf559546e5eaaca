"""insertrec on Apache Spark: the same features, statistics and decisions, computed by partition.

Imported only when a command is given ``--engine spark`` (``pip install insertrec[spark]``):
nothing else in insertrec imports this package, so the local path never pays for PySpark.

- `session`: the SparkSession a command runs on (master, settings passed through).
- `tables`: a data directory (CSV or Parquet files, or directories of part files) read into
  Spark and checked by the local loader's own parsers, partition by partition.
- `features`: feature parameters from Spark aggregations; each customer's point-in-time
  features and rewards from the project's own feature code, one customer group at a time.
- `statistics`: the value model's per-block sufficient statistics summed across partitions.
- `decisions`: batch decisions on Spark through the Engine's own batch decision
  (`insertrec recommend --engine spark`).
- `training`: `insertrec train --engine spark`, the local `train` with the three steps above
  computed on Spark (the driver still holds the collected tables and features).
"""

__all__: list[str] = []
