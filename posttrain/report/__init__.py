"""The run report: one self-contained `report.html` in the run workspace (plots embedded as PNG data
URIs), written by the DAG's last task from what the run left in its workspace.

- collect.py reads the workspace (any URI a `Store` reaches: file:// or s3://) into `RunData`;
- panels.py turns it into the report's panels, each saying so when its data is missing;
- plots.py draws with matplotlib (imported when a plot is drawn, never at DAG parse time);
- page.py lays the panels out as one HTML page.

Torch-free and airflow-free: the Airflow task (operators/report.py) passes the task durations it
read from the DAG run and a function that opens a URI through the storage connection.
"""

