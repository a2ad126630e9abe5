"""The paper's analyses of θ, one module and one ``taskvec`` subcommand each: ``geometry`` (Figures 5 and 9),
``conflict`` (Table 2, Figure 6), ``vocab`` (Tables 3 and 7) and ``export`` (θ as a safetensors file)."""
