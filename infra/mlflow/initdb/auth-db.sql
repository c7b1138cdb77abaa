-- The basic-auth app's users and permissions live in their own database beside the tracking
-- store's (infra/mlflow/basic_auth.ini); PostgreSQL runs this once, on its first start.
CREATE DATABASE mlflow_auth;
