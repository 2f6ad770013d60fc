/** Tailwind is built at development time (`npm run build:css`); the output is committed. */
module.exports = {
  content: ["./templates/**/*.html", "./static/js/**/*.js", "./mistudio/templatetags/*.py", "./models_app/**/*.py", "./activations_app/**/*.py"],
  theme: { extend: {} },
  plugins: [],
};
